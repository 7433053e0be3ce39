"""The errors a user can cause. The CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input: a config key, a file, a dataset line. The message names what is wrong."""


class NotApplicable(UserError):
    """A configuration that cannot be formed on this many ranks (recorded, not a failure)."""
