"""How gptbench's own benchmarks (bench-cpu, gpu-check) print a figure and a target's
verdict: one vocabulary for both."""


def fmt(value, spec: str, none: str = "-") -> str:
    """`value` formatted with `spec`, or `none` where it is unknown."""
    return none if value is None else format(value, spec)


def verdict(met) -> str:
    """A target: met, not met, or unknown (nothing measured to judge it by)."""
    return {True: "met", False: "not met", None: "unknown"}[met]
