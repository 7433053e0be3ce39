"""What a number or a string handed to gptbench can mean, checked in one place.

Every value a user gives (config keys, `--set`, CLI flags, suite rows, hostfiles,
GPTBENCH_FAULT) and every text file gptbench reads passes through here before anything
starts: a value outside its range is a `UserError` (one line, exit 2) naming the key or
file, never an overflow or a NaN found later inside a C++ call. The bounds are the ranges
within which a value still means something, not tuning limits:

- integers that count things (ranks, tokens, samples) stay far below where int64 or the
  machine's memory gives out; a seed is any 64-bit unsigned value (torch's generators);
- floats are finite; durations are below ~116 days (timers and `timedelta` overflow
  on the huge finite ones);
- strings that become file names stay within Linux's NAME_MAX / PATH_MAX and hold no
  control characters;
- local ranks are processes on this machine: at most RANKS_PER_CORE per core, threads at
  most the cores.
"""
from __future__ import annotations

import math
import os
import re
import reprlib

import yaml

from gptbench.errors import UserError

SEED_MAX = 2 ** 64 - 1       # torch.Generator.manual_seed takes [0, 2**64)
MAX_WORLD = 65536            # ranks of one run, all hosts together
MAX_SLOTS_PER_HOST = 1024    # a hostfile line's slots
RANKS_PER_CORE = 8           # local ranks on a machine: each is a process with torch loaded
MAX_BATCH = 65536            # sequences per batch
MAX_LEN = 1 << 20            # tokens of a prompt or of an output (no GPT-2 has more positions)
MAX_COUNT = 1_000_000        # samples, iterations, warm-up batches
MAX_TOKENS_PER_REPLICA = 1 << 28   # num_samples x input_len: 2 GiB of int64 token ids
MAX_SECONDS = 10 ** 7        # timeouts (~116 days)
NAME_MAX = 255               # bytes of one path component (Linux)
PATH_MAX = 4096              # bytes of a whole path (Linux)
RUN_ID_MAX = 200             # run_id + the longest suffix gptbench adds stays within NAME_MAX
MAX_CONFIG_BYTES = 1 << 20   # a config, suite or hostfile larger than 1 MiB is not one
MAX_YAML_DEPTH = 32          # the deepest config section is two levels; suites a few more
MAX_YAML_VALUES = 100_000    # values of a document, aliases expanded ("billion laughs")
RUN_ID = re.compile(r"[A-Za-z0-9_.-]+")
ASCII_DIGITS = re.compile(r"[0-9]{1,18}")


def cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value, low: int, high: int, why: str = "") -> int:
    """`value` when it is an integer in [low, high]; UserError naming `key` otherwise."""
    if not is_int(value):
        raise UserError(f"{key}: expected an integer, got {show(value)}")
    if not low <= value <= high:
        raise UserError(f"{key}: {number(value)} is outside {low}..{high:,}"
                        + (f" ({why})" if why else ""))
    return value


def check_float(key: str, value, low: float, high: float, low_open: bool = False) -> float:
    """`value` when it is a finite number in [low, high] ((low, high] with `low_open`)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"{key}: expected a number, got {show(value)}")
    if is_int(value) and abs(value) > 2 ** 1000:
        raise UserError(f"{key}: {number(value)} is outside {low:g}..{high:g}")
    if not math.isfinite(value):
        raise UserError(f"{key}: must be a finite number, got {value}")
    if value < low or value > high or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise UserError(f"{key}: {value:g} is outside what it can mean ({bound}, <= {high:g})")
    return float(value)


def check_seed(key: str, value) -> int:
    return check_int(key, value, 0, SEED_MAX, "a 64-bit unsigned seed")


def check_local_ranks(key: str, ranks: int) -> int:
    """Ranks started as processes on this machine."""
    most = RANKS_PER_CORE * cores()
    return check_int(key, ranks, 1, most,
                     f"at most {RANKS_PER_CORE} ranks per core on this machine's {cores()} "
                     f"core(s); for more, give a --hostfile")


def check_threads(key: str, threads) -> int:
    return check_int(key, threads, 1, cores(), f"this machine has {cores()} core(s)")


def check_text(key: str, value: str, max_len: int = PATH_MAX, empty_ok: bool = False) -> str:
    """A string a user wrote: not empty, no control characters, at most `max_len` bytes."""
    if not isinstance(value, str):
        raise UserError(f"{key}: expected a string, got {show(value)}")
    if not value.strip() and not empty_ok:
        raise UserError(f"{key}: must not be empty")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise UserError(f"{key}: holds the control character {bad!r} at {value.index(bad)}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_len:
        raise UserError(f"{key}: {size} bytes long, at most {max_len}")
    return value


def check_path(key: str, path: str) -> str:
    """A path gptbench will create: each component within NAME_MAX, the whole in PATH_MAX."""
    check_text(key, path)
    full = os.path.abspath(path)
    if len(full.encode("utf-8", "surrogatepass")) > PATH_MAX - NAME_MAX:
        raise UserError(f"{key}: {path} is too long a path (at most "
                        f"{PATH_MAX - NAME_MAX} bytes, room left for the files in it)")
    long = next((p for p in full.split(os.sep)
                 if len(p.encode("utf-8", "surrogatepass")) > NAME_MAX), None)
    if long is not None:
        raise UserError(f"{key}: the name {long[:40]}... is {len(long.encode())} bytes; "
                        f"a file name holds at most {NAME_MAX}")
    return path


def check_run_id(key: str, run_id) -> str:
    """A run_id names files (runs/<run_id>.json, logs/<run_id>.log, ...): ASCII letters,
    digits, '-', '_', '.', not starting with '.' (a hidden file the readers skip)."""
    if not isinstance(run_id, str) or not run_id:
        raise UserError(f"{key}: must be a non-empty name (letters, digits, '-', '_', '.'), "
                        f"got {show(run_id)}")
    if not RUN_ID.fullmatch(run_id) or run_id.startswith("."):
        raise UserError(f"{key}: '{_clip(run_id)}' may hold only ASCII letters, digits, '-', "
                        "'_', '.' and may not start with '.'")
    if len(run_id) > RUN_ID_MAX:
        raise UserError(f"{key}: {len(run_id)} characters long, at most {RUN_ID_MAX} "
                        f"(it becomes file names)")
    return run_id


def ascii_int(text: str) -> int | None:
    """The value of a string of ASCII digits (at most 18), else None; `str.isdigit` also
    says yes to '²' and '٣', which `int` then refuses or reads."""
    return int(text) if ASCII_DIGITS.fullmatch(text) else None


def read_text(path: str, what: str, max_bytes: int | None = None) -> str:
    """The UTF-8 text of a regular file; UserError naming `what`, the file and, for bytes
    that are not UTF-8, the byte offset."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: file not found: {path}")
    try:
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise UserError(f"{what}: {path} is {size:,} bytes, more than such a file can "
                            f"be (at most {max_bytes:,})")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{what}: cannot read {path} ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: {path} is not UTF-8 text (byte {e.start}: "
                        f"0x{data[e.start]:02x})") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mapping keys are strings (config names), each given once."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {key_node.id} is used as a key; keys are names",
                    key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} ({type(key).__name__}) is not a name; "
                    "keys are strings (quote it)", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str, lines: bool = True):
    """The YAML document in `text`: string keys at every level, at most MAX_YAML_DEPTH
    levels; UserError `where[:line]: ...` otherwise (one line, whatever PyYAML raised)."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark and lines else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ValueError as e:  # int() of a number with more digits than Python converts
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0][:120]})") from None
    _check_depth(data, where)
    return data


def _check_depth(data, where: str) -> None:
    """At most MAX_YAML_DEPTH levels and MAX_YAML_VALUES values, counted as the readers
    would see them: an alias is a shared object, which a message or a `set:` pair would
    expand, and a recursive alias (`&a [*a]`) has no end. Each object is walked once."""
    memo, active = {}, set()

    def walk(node, depth: int) -> tuple[int, int]:  # (height, values) of node's tree
        if not isinstance(node, (dict, list)):
            return 0, 1
        key = id(node)
        if key in active:
            raise UserError(f"{where}: an alias refers to itself (a structure without end)")
        if key not in memo:
            if depth >= MAX_YAML_DEPTH:
                raise UserError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
            active.add(key)
            height, values = 0, 1
            for child in (node.values() if isinstance(node, dict) else node):
                h, v = walk(child, depth + 1)
                height, values = max(height, h + 1), values + v
                if values > MAX_YAML_VALUES:
                    raise UserError(f"{where}: more than {MAX_YAML_VALUES:,} values "
                                    "(aliases expanded)")
            active.discard(key)
            memo[key] = height, values
        height, values = memo[key]
        if depth + height >= MAX_YAML_DEPTH:
            raise UserError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
        return height, values

    walk(data, 0)


def writable_folder_problem(folder: str) -> str | None:
    """Why files cannot be created in `folder` (created if missing), or None.

    Probed by creating (and removing) a folder in the nearest existing ancestor: access()
    says yes to root everywhere, even in /proc or on a read-only mount. Nothing stays."""
    import tempfile

    probe = os.path.abspath(folder)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".gptbench-probe-"))
    except OSError as e:
        return f"cannot write in {probe} ({e.strerror})"
    return None


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40


def number(value: int) -> str:
    """An int for a message: its digits, or how many there are when they are too many."""
    if abs(value) <= 10 ** 30:
        return str(value)
    digits = len(str(abs(value))) if abs(value) < 10 ** 4000 else "over 4000"
    return f"an integer of {digits} digits"


def show(value) -> str:
    """`type repr` of a value for a one-line message, bounded whatever its size (a long
    string, a huge int, an alias-expanded list)."""
    if is_int(value):
        return f"int {number(value)}"
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # a huge int inside
        text = "..."
    return f"{type(value).__name__} {text}"
