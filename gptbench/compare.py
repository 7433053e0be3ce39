"""`gptbench compare BASE CANDIDATE --fail-on METRIC:PCT`: per-configuration deltas of the key
metrics of two suites (or two run records), matched by run_id, an environment diff, and a
regression gate in the manner of pytest-benchmark's `--compare-fail mean:5%`."""

import math
from pathlib import Path

from gptbench.errors import UserError
from gptbench.report.load import load_runs, read_run, value_at

# +1: higher is better, -1: lower is better. A metric that can gate needs a direction.
DIRECTIONS = {
    "throughput_tokens_per_s": +1, "speedup": +1, "parallel_efficiency": +1, "gpu_utilization_pct": +1,
    "roofline": +1, "ttft_ms": -1, "tpot_ms": -1, "e2e_ms": -1, "peak_memory_bytes": -1,
    "comm_fraction": -1, "bubble_fraction": -1, "throughput_cv_pct": -1, "timed_wall_s": -1,
}
# Metrics added later with these unit suffixes are costs, so they gate too (lower is better).
LOWER_IS_BETTER_SUFFIXES = ("_ms", "_bytes")
# A dict metric is compared by one field: p50 for latency distributions, a middle that a
# single slow request does not move; p50 too for dict metrics added later.
DICT_FIELDS = {"ttft_ms": "p50", "tpot_ms": "p50", "e2e_ms": "p50", "peak_memory_bytes": "max",
               "gpu_utilization_pct": "mean", "bubble_fraction": "measured", "roofline": "fraction_of_peak"}
SHOWN = ("throughput_tokens_per_s", "speedup", "parallel_efficiency", "ttft_ms", "tpot_ms", "e2e_ms",
         "peak_memory_bytes", "comm_fraction")


def parse_fail_on(spec: str) -> tuple[str, float]:
    """"throughput_tokens_per_s:5" -> ("throughput_tokens_per_s", 5.0); a trailing % is allowed."""
    name, separator, pct_text = spec.rpartition(":")
    try:
        pct = float(pct_text.strip().removesuffix("%"))
    except ValueError:
        pct = math.nan
    if not separator or not name.strip() or not math.isfinite(pct) or pct < 0:
        raise UserError(f"--fail-on {spec!r}: expected METRIC:PCT with PCT a number >= 0, "
                        "e.g. throughput_tokens_per_s:5")
    return name.strip(), pct


def compare(base, candidate, fail_on: list[tuple[str, float]]) -> tuple[str, int]:
    """(text report, exit code): 1 when a fail_on metric of a common run got worse by more than its pct."""
    base_runs, base_skipped = load_side(base)
    candidate_runs, candidate_skipped = load_side(candidate)
    check_gates(fail_on, base_runs + candidate_runs)
    base_by_id = {r["run_id"]: r for r in base_runs}
    candidate_by_id = {r["run_id"]: r for r in candidate_runs}
    common_ids = [run_id for run_id in base_by_id if run_id in candidate_by_id]
    if not common_ids:
        raise UserError(f"no run_id in common: {base} has {', '.join(base_by_id) or 'none'}; "
                        f"{candidate} has {', '.join(candidate_by_id) or 'none'}")
    lines = [f"base:      {base} ({len(base_runs)} runs)", f"candidate: {candidate} ({len(candidate_runs)} runs)", ""]
    lines += environment_lines(base_runs, candidate_runs)
    regressions = []
    for run_id in common_ids:
        run_lines, run_regressions = compare_run(base_by_id[run_id], candidate_by_id[run_id], fail_on)
        lines += [""] + run_lines
        regressions += run_regressions
    lines += [""] + unmatched_lines(base_by_id, candidate_by_id, base_skipped + candidate_skipped)
    lines.append(verdict(fail_on, regressions))
    return "\n".join(lines) + "\n", 1 if regressions else 0


def load_side(path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """A run record file, or a suite directory holding runs/."""
    path = Path(path)
    if path.is_file():
        try:
            return [read_run(path)], []
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from exc
    if path.is_dir():
        return load_runs(path)
    raise UserError(f"{path}: no such run record or suite directory")


def gateable_metrics(records: list[dict]) -> list[str]:
    observed = {key for r in records for key in (r.get("metrics") or {})}
    return sorted(set(DIRECTIONS) | {key for key in observed if key.endswith(LOWER_IS_BETTER_SUFFIXES)})


def check_gates(fail_on: list[tuple[str, float]], records: list[dict]) -> None:
    valid = gateable_metrics(records)
    for name, _ in fail_on:
        if name not in valid:
            raise UserError(f"--fail-on {name!r} is not a metric that can gate a regression; "
                            f"valid: {', '.join(valid)}")


def direction(name: str) -> int:
    return DIRECTIONS.get(name, -1)


def metric_value(record: dict, name: str) -> float | None:
    """The number compared for a metric: the value itself, or one field of a dict metric."""
    value = value_at(record, f"metrics.{name}")
    if isinstance(value, dict):
        value = value.get(DICT_FIELDS.get(name, "p50"))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_label(name: str) -> str:
    return f"{name}.{DICT_FIELDS[name]}" if name in DICT_FIELDS else name


def change_pct(base: float, candidate: float) -> float:
    if base == 0:
        return 0.0 if candidate == 0 else math.copysign(math.inf, candidate)
    return (candidate - base) / abs(base) * 100


def compare_run(base: dict, candidate: dict, fail_on: list[tuple[str, float]]) -> tuple[list[str], list[str]]:
    """(report lines, regression descriptions) for one configuration."""
    limits = dict(fail_on)
    lines = [f"{base['run_id']} ({base.get('strategy')}, world_size {value_at(base, 'topology.world_size')})"]
    if base["status"] != "ok" or candidate["status"] != "ok":
        lines.append(f"  status: {base['status']} -> {candidate['status']}"
                     + ("" if candidate["status"] == "ok" else f" ({candidate.get('error')})"))
    if base["status"] != "ok" and candidate["status"] != "ok":
        return lines, []  # no numbers on either side
    lines.append(f"  {'metric':<28}{'base':>12}{'candidate':>12}{'change':>10}")
    regressions = []
    for name in list(SHOWN) + [n for n in limits if n not in SHOWN]:
        before, after = metric_value(base, name), metric_value(candidate, name)
        change = None if before is None or after is None else change_pct(before, after)
        verdict_text = gate(name, before, after, change, limits.get(name))
        if verdict_text:
            regressions.append(f"{base['run_id']} {metric_label(name)}: {verdict_text}")
        change_text = "—" if change is None else f"{change:+.1f}%"
        flag = f"  REGRESSION: {verdict_text}" if verdict_text else ""
        lines.append(f"  {metric_label(name):<28}{fmt(before):>12}{fmt(after):>12}{change_text:>10}{flag}")
    return lines, regressions


def gate(name: str, before, after, change, limit_pct) -> str | None:
    """Why this value is a regression beyond limit_pct, or None."""
    if limit_pct is None or before is None:
        return None  # no gate, or nothing to regress from
    if after is None:
        return "missing in candidate"
    worse_pct = -direction(name) * change
    if worse_pct > limit_pct:
        return f"{worse_pct:.1f}% worse, limit {limit_pct:g}%"
    return None


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def environment_lines(base_runs: list[dict], candidate_runs: list[dict]) -> list[str]:
    """The env keys (versions, device_name, ...) whose values differ between the two sides."""
    def values(runs, key):
        return sorted({str(value_at(r, f"env.{key}")) for r in runs if isinstance(r.get("env"), dict)})

    keys = dict.fromkeys(key for r in base_runs + candidate_runs for key in (r.get("env") or {}))
    changed = [f"  {key}: {', '.join(values(base_runs, key))} -> {', '.join(values(candidate_runs, key))}"
               for key in keys if values(base_runs, key) != values(candidate_runs, key)]
    return ["Environment differences:"] + changed if changed else ["Environment: identical"]


def unmatched_lines(base_by_id: dict, candidate_by_id: dict, skipped: list[tuple[Path, str]]) -> list[str]:
    only_base = [run_id for run_id in base_by_id if run_id not in candidate_by_id]
    only_candidate = [run_id for run_id in candidate_by_id if run_id not in base_by_id]
    lines = [f"Only in base: {', '.join(only_base)}"] if only_base else []
    lines += [f"Only in candidate: {', '.join(only_candidate)}"] if only_candidate else []
    return lines + [f"Skipped {path}: {reason}" for path, reason in skipped]


def verdict(fail_on: list[tuple[str, float]], regressions: list[str]) -> str:
    if not fail_on:
        return "Result: no --fail-on gate given"
    if not regressions:
        return "Result: no regression beyond the --fail-on limits"
    listed = "\n".join(f"  {r}" for r in regressions)
    return f"Result: {len(regressions)} regression(s) beyond the --fail-on limits:\n{listed}"
