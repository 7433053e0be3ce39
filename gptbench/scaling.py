"""Speedup, parallel efficiency and the scaling label, derived when records are read.

A stored speedup goes stale: rerunning the baseline (`gptbench suite ... --only 1r-dp`)
would leave every other record compared with a throughput that is gone. So records keep
these fields null (`results.DERIVED`) and `gptbench report`, `gptbench compare` and
`make bench-cpu` compute them here, from the records present.

The baseline of a run is a finished 1-rank run (dp = tp = pp = 1) measured on the same
device (`env.device_name`), in the same dtype, of the same model (name, preset), workload
(batch_size, input_len, output_len, num_samples per replica) and engine switches
(`engine.backend`, `kernel_inject`, `cuda_graph`, `compile`; a missing switch is off). When
several match, the newest (`created_at`) is the baseline.

speedup = tokens/s / the baseline's tokens/s; parallel efficiency = speedup / ranks. The
label says what kind of scaling the speedup measures, by what the run did:
- `baseline`: one rank (its speedup against itself is 1);
- `weak`: dp > 1; every replica generates `num_samples`, so the work grows with the ranks;
- `strong`: dp = 1 with tp or pp > 1; the baseline's work split over more ranks.

Their 95 % intervals (`metrics.intervals.speedup`, `.parallel_efficiency`) bootstrap the
ratio from the two runs' timed batches (`metrics.batches`: tokens and seconds per batch):
each run's batches resampled on its own, the speedup scaled by the ratio of the two
resamples' tokens/s factors (stats.ratio_factors), the 2.5th and 97.5th percentiles kept.
"""
from __future__ import annotations

import copy
import math

from gptbench import stats
from gptbench.results import DERIVED_KEYS, value_at

# A switch absent from a record (written before it existed) was off.
ENGINE_SWITCHES = {"backend": "deepspeed", "kernel_inject": False, "cuda_graph": False,
                   "compile": "off"}
WORKLOAD_KEYS = ("dtype", "batch_size", "input_len", "output_len", "num_samples")
NO_BASELINE = ("no finished 1-rank run in this folder with the same device, dtype, model, "
               "workload and engine switches (backend, kernel_inject, cuda_graph, compile)")
NO_BATCHES = "needs the per-batch figures (metrics.batches, 2 or more batches) of the run and its baseline"
RATIO_METHOD = ("percentile bootstrap of the ratio: each run's timed batches resampled on their own "
                "(1000 resamples, seeds 0 and 1), speedup x the ratio of the two resamples' "
                "tokens/s to the whole samples'")


def engine_switches(record: dict) -> tuple:
    engine = record.get("engine") or {}
    return tuple(off if engine.get(k) is None else engine[k] for k, off in ENGINE_SWITCHES.items())


def baseline_key(record: dict) -> tuple:
    """What a run and its baseline must share."""
    return (value_at(record, "env.device_name"), value_at(record, "model.name"),
            value_at(record, "model.preset"),
            *(value_at(record, f"workload.{k}") for k in WORKLOAD_KEYS),
            *engine_switches(record))


def is_one_rank(record: dict) -> bool:
    topology = record.get("topology") or {}
    return topology.get("world_size") == 1 and all(topology.get(a) in (1, None)
                                                    for a in ("dp", "tp", "pp"))


def label(record: dict) -> str:
    topology = record.get("topology") or {}
    if is_one_rank(record):
        return "baseline"
    return "weak" if (topology.get("dp") or 1) > 1 else "strong"


def find_baseline(record: dict, records: list[dict]) -> dict | None:
    key = baseline_key(record)
    found = [r for r in records if r.get("status") == "ok" and is_one_rank(r)
             and value_at(r, "metrics.throughput_tokens_per_s") and baseline_key(r) == key]
    return max(found, key=lambda r: str(r.get("created_at") or "")) if found else None


def relative_to(record: dict, baseline: dict) -> dict:
    """{speedup, parallel_efficiency, scaling, baseline_run_id} of `record` against `baseline`
    (both finished runs with a throughput)."""
    speedup = (record["metrics"]["throughput_tokens_per_s"]
               / baseline["metrics"]["throughput_tokens_per_s"])
    topology = record.get("topology") or {}
    ranks = topology.get("world_size") or math.prod(topology.get(a) or 1 for a in ("dp", "tp", "pp"))
    return {"speedup": speedup, "parallel_efficiency": speedup / ranks,
            "scaling": label(record), "baseline_run_id": baseline["run_id"]}


def _factors(record: dict, seed: int) -> list[float] | None:
    tokens, wall = value_at(record, "metrics.batches.tokens"), value_at(record, "metrics.batches.wall_s")
    if not tokens or not wall or len(tokens) != len(wall) or len(tokens) < 2 or not sum(wall):
        return None
    return stats.ratio_factors(tokens, wall, seed=seed)


def ratio_interval(record: dict, baseline: dict, speedup: float) -> list[float] | None:
    """The speedup's 95 % interval from the two runs' batches, or None without them. A run
    against itself (the baseline) draws the same resamples: [1, 1]."""
    mine = _factors(record, stats.SEED)
    theirs = _factors(baseline, stats.SEED + (record["run_id"] != baseline["run_id"]))
    if mine is None or theirs is None:
        return None
    return stats.percentile_interval([speedup * a / b for a, b in zip(mine, theirs)])


def _with_intervals(record: dict, baseline: dict | None, derived: dict, reasons: dict) -> None:
    """metrics.intervals.{speedup, parallel_efficiency}, or null with the reason; a record
    written before intervals existed is left as it is."""
    block = dict(record["metrics"].get("intervals") or {})
    if not block:
        return
    ci = ratio_interval(record, baseline, derived["speedup"]) if baseline else None
    for key in ("metrics.intervals.speedup", "metrics.intervals.parallel_efficiency"):
        if ci is None:
            reasons[key] = NO_BASELINE if baseline is None else NO_BATCHES
        else:
            reasons.pop(key, None)
    ranks = derived["speedup"] / derived["parallel_efficiency"] if ci else None
    block.update(speedup=ci, parallel_efficiency=[x / ranks for x in ci] if ci else None,
                 ratio_method=RATIO_METHOD)
    record["metrics"]["intervals"] = block


def derive(records: list[dict]) -> list[dict]:
    """Copies of `records`; the finished ones with the DERIVED_KEYS filled against their
    baseline, or null with the reason in null_reasons."""
    out = []
    for record in records:
        record = copy.copy(record)
        if isinstance(record.get("metrics"), dict) and record.get("status") != "ok":
            record["metrics"] = {**record["metrics"], **dict.fromkeys(DERIVED_KEYS)}
        elif isinstance(record.get("metrics"), dict):
            record["metrics"] = dict(record["metrics"])
            record["null_reasons"] = reasons = dict(record.get("null_reasons") or {})
            baseline = find_baseline(record, records)
            derived = (relative_to(record, baseline) if baseline
                       else {**dict.fromkeys(DERIVED_KEYS), "scaling": label(record)})
            record["metrics"].update(derived)
            _with_intervals(record, baseline, derived, reasons)
            for key in DERIVED_KEYS:
                if derived[key] is None:
                    reasons[f"metrics.{key}"] = NO_BASELINE
                else:
                    reasons.pop(f"metrics.{key}", None)
        out.append(record)
    return out
