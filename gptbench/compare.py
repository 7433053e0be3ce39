"""`gptbench compare BASE CANDIDATE --fail-on METRIC:PCT[,METRIC:PCT]`: per-configuration
deltas of two suites (or two run records), an environment diff, and a regression gate in the
manner of pytest-benchmark's `--compare-fail mean:5%`.

Runs are matched by run_id, then the rest by configuration (strategy, grid, model, workload,
engine switches), which pairs a `gptbench run` folder (`2r-dp-tp1-pp1`) with a suite's
(`2r-dp`); every such pair is named. A gate must compare something: one that found the
metric in no matched run is exit 2, and a base run with no match in the candidate fails the
gate unless `--allow-missing`. Speedup and efficiency are derived per folder (`scaling`).

Noise (`--noise`): a change beyond its limit fails the gate only when it is also told apart
from noise: `intervals` (the default), the two runs' 95 % bootstrap intervals
(`metrics.intervals`) do not overlap; `mann-whitney`, the two runs' per-batch figures
(`metrics.batches`) differ by a two-sided Mann-Whitney U test at p < 0.05; `none`, the
percentage alone. Where the records have no interval or per-batch figures for the metric,
the percentage alone decides, and the line says so.
"""

import math
from pathlib import Path

from gptbench import scaling, stats
from gptbench.errors import UserError
from gptbench.report.load import load_runs
from gptbench.results import read_run, value_at

# +1: higher is better, -1: lower is better. A metric that can gate needs a direction.
DIRECTIONS = {
    "throughput_tokens_per_s": +1, "speedup": +1, "parallel_efficiency": +1,
    "roofline": +1, "ttft_ms": -1, "tpot_ms": -1, "e2e_ms": -1, "peak_memory_bytes": -1,
    "comm_fraction": -1, "bubble_fraction": -1, "throughput_cv_pct": -1, "timed_wall_s": -1,
    "compile_s": -1, "graph_breaks": -1,
}
# Metrics added later with these unit suffixes are costs, so they gate too (lower is better).
LOWER_IS_BETTER_SUFFIXES = ("_ms", "_bytes", "_s")
# The field a dict metric is compared by when its name alone is given: p50 for latency
# distributions, a middle that a single slow request does not move.
DICT_FIELDS = {"ttft_ms": "p50", "tpot_ms": "p50", "e2e_ms": "p50", "peak_memory_bytes": "max",
               "bubble_fraction": "measured", "roofline": "fraction_of_peak"}
# Metrics with no better direction: they never gate, and the message says why.
NOT_RANKED = {
    "gpu_utilization_pct": (
        "GPU utilisation is kernel-resident time (NVML counts a kernel spin-waiting for a peer "
        "as busy, so pipeline bubbles and tensor-parallel stragglers read as utilised): higher "
        "is not better, so it ranks nothing; the pipeline's work figure is "
        "bubble_fraction.stage_busy_fraction"),
}
LATENCY_FIELDS = ("mean", "p50", "p90", "p99", "min", "max")
# Fields of dict metrics that gate by name, where the direction is not the metric's.
FIELD_DIRECTIONS = {
    "time_breakdown.compute": +1, "time_breakdown.communication": -1, "time_breakdown.waiting": -1,
    "roofline.achieved_gbps": +1, "bubble_fraction.measured": -1,
}
NOISE_RULES = ("intervals", "mann-whitney", "none")
ALPHA = 0.05  # Mann-Whitney: a difference is real below this two-sided p-value
# gate name -> the key of its interval in metrics.intervals
INTERVAL_KEYS = {"throughput_tokens_per_s": "throughput_tokens_per_s", "ttft_ms.p50": "ttft_ms_p50",
                 "tpot_ms.p50": "tpot_ms_p50", "speedup": "speedup",
                 "parallel_efficiency": "parallel_efficiency"}
SHOWN = ("throughput_tokens_per_s", "speedup", "parallel_efficiency", "ttft_ms.p50", "ttft_ms.p99",
         "tpot_ms.p50", "tpot_ms.p99", "e2e_ms.p50", "peak_memory_bytes.max", "comm_fraction")


def parse_fail_on(spec: str) -> list[tuple[str, float]]:
    """"ttft_ms.p99:5,throughput_tokens_per_s:2%" -> [("ttft_ms.p99", 5.0), (...)]."""
    gates = []
    for part in spec.split(","):
        name, separator, pct_text = part.rpartition(":")
        try:
            pct = float(pct_text.strip().removesuffix("%"))
        except ValueError:
            pct = math.nan
        if not separator or not name.strip() or not math.isfinite(pct) or pct < 0:
            raise UserError(f"--fail-on {spec!r}: expected METRIC:PCT[,METRIC:PCT] with PCT a "
                            "number >= 0, e.g. throughput_tokens_per_s:5,ttft_ms.p99:10")
        gates.append((name.strip(), pct))
    return gates


def gate_path(name: str) -> tuple[str, int] | None:
    """(the name as compare prints it, direction) of a gateable metric, or None."""
    if name in FIELD_DIRECTIONS:
        return name, FIELD_DIRECTIONS[name]
    top, _, field = name.partition(".")
    direction = DIRECTIONS.get(top, -1 if top.endswith(LOWER_IS_BETTER_SUFFIXES) else None)
    if direction is None:
        return None
    if not field:
        return (f"{top}.{DICT_FIELDS[top]}" if top in DICT_FIELDS else top), direction
    if field == DICT_FIELDS.get(top) or (top.endswith("_ms") and field in LATENCY_FIELDS):
        return name, direction
    return None


def check_gates(fail_on: list[tuple[str, float]]) -> list[tuple[str, int, float]]:
    """[(printed name, direction, limit pct)]; UserError for a name that cannot gate."""
    gates = []
    for name, pct in fail_on:
        if name.partition(".")[0] in NOT_RANKED:
            raise UserError(f"--fail-on {name!r}: {NOT_RANKED[name.partition('.')[0]]}")
        found = gate_path(name)
        if found is None:
            valid = sorted({gate_path(n)[0] for n in DIRECTIONS} | set(FIELD_DIRECTIONS)
                           | {f"{n}.{f}" for n in ("ttft_ms", "tpot_ms", "e2e_ms") for f in LATENCY_FIELDS})
            raise UserError(f"--fail-on {name!r} is not a metric that can gate a regression; "
                            f"valid: {', '.join(valid)} (a dict metric alone means its field shown here)")
        gates.append((*found, pct))
    return gates


def check_recorded(gates: list, runs: list[dict], base, candidate) -> None:
    """A gate named only by its unit suffix (a metric gptbench may add later) must be a
    metric some record holds; else it is a typo (`latency_s`), refused before any output."""
    for name, _, _ in gates:
        top = name.partition(".")[0]
        if name in FIELD_DIRECTIONS or top in DIRECTIONS:
            continue
        if not any(isinstance(r.get("metrics"), dict) and top in r["metrics"] for r in runs):
            known = sorted({k for r in runs if isinstance(r.get("metrics"), dict)
                            for k in r["metrics"]} | set(DIRECTIONS))
            raise UserError(f"--fail-on {name}: no run of {base} or {candidate} records "
                            f"metrics.{top} (metrics: {', '.join(known)})")


def compare(base, candidate, fail_on: list[tuple[str, float]],
            allow_missing: bool = False, noise: str = "intervals") -> tuple[str, int]:
    """(text report, exit code): 1 when a gate finds a regression (or a base run is missing
    from the candidate), 2 when a gate compared nothing."""
    if noise not in NOISE_RULES:
        raise UserError(f"--noise {noise!r}: expected one of {', '.join(NOISE_RULES)}")
    gates = check_gates(fail_on)
    base_runs, base_skipped = load_side(base)
    candidate_runs, candidate_skipped = load_side(candidate)
    check_recorded(gates, base_runs + candidate_runs, base, candidate)
    pairs, notes = match_runs(base_runs, candidate_runs, single=Path(base).is_file() and Path(candidate).is_file())
    if not pairs:
        raise UserError(f"nothing to compare: no run in common by run_id or by configuration; "
                        f"{base} has {', '.join(r['run_id'] for r in base_runs) or 'none'}; "
                        f"{candidate} has {', '.join(r['run_id'] for r in candidate_runs) or 'none'}")
    lines = [f"base:      {base} ({len(base_runs)} runs)", f"candidate: {candidate} ({len(candidate_runs)} runs)"]
    lines += [f"Skipped {path}: {reason}" for path, reason in base_skipped + candidate_skipped]
    lines += [""] + environment_lines(base_runs, candidate_runs) + notes
    if gates:
        lines.append(f"Gate rule: {NOISE_TEXT[noise]}")
    regressions, compared = [], {name: 0 for name, _, _ in gates}
    for before, after in pairs:
        run_lines, run_regressions = compare_run(before, after, gates, compared, noise)
        lines += [""] + run_lines
        regressions += run_regressions
    paired_base = {id(b) for b, _ in pairs}
    missing = [r["run_id"] for r in base_runs if id(r) not in paired_base]
    extra = [r["run_id"] for r in candidate_runs if id(r) not in {id(c) for _, c in pairs}]
    lines += [""] + ([f"Only in base: {', '.join(missing)}"] if missing else [])
    lines += [f"Only in candidate: {', '.join(extra)}"] if extra else []
    if gates and missing and not allow_missing:
        regressions += [f"{run_id}: in base, not in candidate (--allow-missing accepts this)"
                        for run_id in missing]
    empty = [name for name, count in compared.items() if count == 0]
    if empty:
        lines.append(nothing_compared(empty, [b for b, _ in pairs]))
        return "\n".join(lines) + "\n", 2
    lines.append(verdict(gates, regressions, sum("  WITHIN NOISE: " in line for line in lines)))
    return "\n".join(lines) + "\n", 1 if regressions else 0


def load_side(path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """A run record file, or a suite directory holding runs/."""
    path = Path(path)
    if path.is_file():
        try:
            return scaling.derive([read_run(path)]), []
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from exc
    if path.is_dir():
        return load_runs(path)
    raise UserError(f"{path}: no such run record or suite directory")


def configuration(record: dict) -> tuple:
    """What makes two runs the same experiment, whatever their run_ids."""
    return (record.get("strategy"),
            *(value_at(record, f"topology.{axis}") for axis in ("world_size", "dp", "tp", "pp")),
            scaling.baseline_key(record)[1:])  # model, workload, engine switches; not the device


def match_runs(base_runs: list[dict], candidate_runs: list[dict], single: bool = False):
    """([(base, candidate)], note lines): by run_id, then by configuration where it is unique
    on both sides; two single records are compared whatever they hold."""
    by_id = {r["run_id"]: r for r in candidate_runs}
    pairs = [(b, by_id[b["run_id"]]) for b in base_runs if b["run_id"] in by_id]
    left_b = [b for b in base_runs if b["run_id"] not in by_id]
    taken = {b["run_id"] for b in base_runs}
    left_c = [c for c in candidate_runs if c["run_id"] not in taken]
    notes = []
    for b in left_b:
        same_b = [x for x in left_b if configuration(x) == configuration(b)]
        same_c = [c for c in left_c if configuration(c) == configuration(b)]
        if len(same_b) == 1 and len(same_c) == 1:
            pairs.append((b, same_c[0]))
            notes.append(f"Matched by configuration (strategy, grid, model, workload, engine "
                         f"switches): {b['run_id']} (base) = {same_c[0]['run_id']} (candidate)")
    if not pairs and single and base_runs and candidate_runs:
        pairs = [(base_runs[0], candidate_runs[0])]
        notes.append(f"Two single records compared although their configurations differ: "
                     f"{base_runs[0]['run_id']} (base), {candidate_runs[0]['run_id']} (candidate)")
    return pairs, notes


def metric_value(record: dict, name: str) -> float | None:
    value = value_at(record, f"metrics.{name}")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def change_pct(base: float, candidate: float) -> float:
    if base == 0:
        return 0.0 if candidate == 0 else math.copysign(math.inf, candidate)
    return (candidate - base) / abs(base) * 100


def compare_run(base: dict, candidate: dict, gates: list, compared: dict,
                noise: str = "intervals") -> tuple[list[str], list[str]]:
    """(report lines, regression descriptions) for one pair; counts what each gate compared."""
    ids = base["run_id"] if base["run_id"] == candidate["run_id"] else f"{base['run_id']} = {candidate['run_id']}"
    lines = [f"{ids} ({base.get('strategy')}, world_size {value_at(base, 'topology.world_size')})"]
    if base["status"] != "ok" or candidate["status"] != "ok":
        lines.append(f"  status: {base['status']} -> {candidate['status']}"
                     + ("" if candidate["status"] == "ok" else f" ({candidate.get('error')})"))
    if base["status"] != "ok" and candidate["status"] != "ok":
        return lines, []  # no numbers on either side
    lines.append(f"  {'metric':<28}{'base':>12}{'candidate':>12}{'change':>10}")
    limits = {name: (direction, pct) for name, direction, pct in gates}
    regressions = []
    for name in list(SHOWN) + [n for n in limits if n not in SHOWN]:
        before, after = metric_value(base, name), metric_value(candidate, name)
        change = None if before is None or after is None else change_pct(before, after)
        direction, limit = limits.get(name, (None, None))
        if limit is not None and before is not None:
            compared[name] += 1
        verdict_text = gate(direction, before, after, change, limit)
        flag = ""
        if verdict_text and after is not None:
            real, why = told_apart(base, candidate, name, noise)
            verdict_text += f"; {why}"
            if not real:
                flag = f"  WITHIN NOISE: {verdict_text}"
                verdict_text = None
        if verdict_text:
            regressions.append(f"{base['run_id']} {name}: {verdict_text}")
            flag = f"  REGRESSION: {verdict_text}"
        change_text = "—" if change is None else f"{change:+.1f}%"
        lines.append(f"  {name:<28}{fmt(before):>12}{fmt(after):>12}{change_text:>10}{flag}")
    return lines, regressions


def gate(direction, before, after, change, limit_pct) -> str | None:
    """Why this value is a regression beyond limit_pct, or None."""
    if limit_pct is None or before is None:
        return None  # no gate, or nothing to regress from
    if after is None:
        return "missing in candidate"
    worse_pct = -direction * change
    if worse_pct > limit_pct:
        return f"{worse_pct:.1f}% worse, limit {limit_pct:g}%"
    return None


NOISE_TEXT = {
    "intervals": "a change beyond its limit fails only when the two runs' 95 % bootstrap "
                 "intervals do not overlap (--noise intervals)",
    "mann-whitney": f"a change beyond its limit fails only when a two-sided Mann-Whitney U test "
                    f"on the two runs' per-batch figures gives p < {ALPHA:g} (--noise mann-whitney)",
    "none": "a change beyond its limit fails, whatever the noise (--noise none)",
}


def interval_of(record: dict, name: str) -> list[float] | None:
    key = INTERVAL_KEYS.get(name)
    ci = value_at(record, f"metrics.intervals.{key}") if key else None
    return ci if isinstance(ci, list) and len(ci) == 2 and None not in ci else None


def batch_values(record: dict, name: str) -> list[float] | None:
    """The per-batch figures behind a gate's metric (tokens/s, TTFT or TPOT p50 per batch)."""
    batches = value_at(record, "metrics.batches") or {}
    if name == "throughput_tokens_per_s":
        tokens, wall = batches.get("tokens") or [], batches.get("wall_s") or []
        values = [t / w for t, w in zip(tokens, wall) if w]
    elif name in ("ttft_ms.p50", "tpot_ms.p50"):
        values = [v for v in batches.get(name.replace(".", "_")) or [] if v is not None]
    else:
        return None
    return values if len(values) >= 2 else None


def told_apart(base: dict, candidate: dict, name: str, noise: str) -> tuple[bool, str]:
    """(whether a change beyond the limit is more than noise, which rule said so and how)."""
    if noise == "intervals":
        a, b = interval_of(base, name), interval_of(candidate, name)
        if a and b:
            shown = f"base [{fmt(a[0])}, {fmt(a[1])}], candidate [{fmt(b[0])}, {fmt(b[1])}]"
            if a[0] <= b[1] and b[0] <= a[1]:
                return False, f"95 % intervals overlap ({shown})"
            return True, f"95 % intervals apart ({shown})"
        return True, "percentage alone (no 95 % interval of this metric in both records)"
    if noise == "mann-whitney":
        a, b = batch_values(base, name), batch_values(candidate, name)
        test = stats.mann_whitney(a, b) if a and b else None
        if test is None:
            return True, "percentage alone (no per-batch figures of this metric in both records)"
        p = test[1]
        where = f"Mann-Whitney p={p:.3g} on {len(a)} vs {len(b)} batches"
        return (True, where) if p < ALPHA else (False, f"{where}, not below {ALPHA:g}")
    return True, "percentage alone (--noise none)"


def nothing_compared(names: list[str], base_runs: list[dict]) -> str:
    why = []
    for name in names:
        reason = null_reason(base_runs, name)
        why.append(f"--fail-on {name}" + (f" (null in base: {reason})" if reason else ""))
    return (f"Result: ERROR: {'; '.join(why)} compared nothing: no matched run has the metric "
            "in base, so the gate cannot pass or fail")


def null_reason(records: list[dict], name: str) -> str | None:
    """The first record's reason why metrics.<name> (or its dict) is null."""
    for record in records:
        reasons = record.get("null_reasons") or {}
        for key in (f"metrics.{name}", f"metrics.{name.partition('.')[0]}"):
            if key in reasons:
                return reasons[key]
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


def verdict(gates: list, regressions: list[str], within_noise: int = 0) -> str:
    if not gates:
        return "Result: no --fail-on gate given"
    if not regressions:
        return "Result: no regression beyond the --fail-on limits" + (
            f" ({within_noise} change(s) beyond a limit within noise)" if within_noise else "")
    listed = "\n".join(f"  {r}" for r in regressions)
    return f"Result: {len(regressions)} regression(s) beyond the --fail-on limits:\n{listed}"
