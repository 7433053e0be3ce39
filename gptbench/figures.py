"""The record's figures derived from every rank's measurements: the time breakdown and the
pipeline bubble (results.aggregate_metrics calls `profile_metrics`), the roofline, the
model's memory per rank and the predicted TPOT (the worker calls `model_metrics`).
"""
from __future__ import annotations

import statistics

from gptbench import sharding
from gptbench.measure import run_layout
from gptbench.trackers import breakdown, latency


def _latency_entries(lay: sharding.Layout, ranks: list[dict]) -> list[dict]:
    sizes = {"all_reduce": (lay.tp, lay.dp * lay.pp), "broadcast": (lay.pp, lay.dp * lay.tp),
             "barrier": (lay.dp * lay.tp * lay.pp, 1), "p2p": (2, lay.dp * lay.tp),
             "p2p_ready": (2, lay.dp * lay.tp)}
    out = []
    for key in ranks[0]["profile"]["latency_s"]:
        op, nbytes = key.split(":")
        group_size, concurrent = sizes[op]
        out.append(latency.entry(op, group_size, concurrent, int(nbytes),
                                 [r["profile"]["latency_s"].get(key) for r in ranks],
                                 latency.DEFAULT_ITERATIONS))
    return [e for e in out if e]


def _profiles(ranks: list[dict]) -> dict[int, dict] | None:
    profiles = {r["rank"]: r.get("profile") for r in ranks}
    return profiles if all(profiles.values()) else None


def profile_metrics(ranks: list[dict], grid, micro_batches: int, reasons: dict) -> dict:
    """`time_breakdown`, `comm_fraction(_per_rank)` and `bubble_fraction` of the record
    (results.aggregate_metrics calls this); null with a reason when not profiled."""
    from gptbench.roofline import bubble_theory

    out = dict.fromkeys(("time_breakdown", "comm_fraction", "comm_fraction_per_rank",
                         "bubble_fraction"))
    profiles = _profiles(ranks)
    if profiles is None:
        for key in out:
            reasons[f"metrics.{key}"] = "communication profiling is off (engine.profile_comm)"
        return out
    block, _ = breakdown.time_breakdown(profiles)
    if any(r.get("profile_eager") for r in ranks):
        block["source"] += ("; this compiled tensor-parallel row's profiled batch ran eagerly "
                            "(tracked collectives would split its graphs)")
    out["time_breakdown"] = block
    out["comm_fraction"] = block["communication"]
    if block["communication"] is None:  # e.g. NCCL gave no kernel times
        reasons["metrics.comm_fraction"] = block["source"]
    out["comm_fraction_per_rank"] = [f["communication"] for f in block["per_rank"]]
    if grid.pp == 1:
        reasons["metrics.bubble_fraction"] = "no pipeline (pp=1)"
        return out
    first = profiles[min(profiles)]
    schedule = first.get("schedule") or "flush"
    by_stage = [[f["waiting"] for r, f in zip(sorted(profiles), block["per_rank"])
                 if grid.coords(r)[0] == s] for s in range(grid.pp)]
    busy = [profiles[r]["busy_s"] / (profiles[r]["marks_s"][-1] - profiles[r]["marks_s"][0])
            if profiles[r].get("busy_s") is not None else None for r in sorted(profiles)]
    out["bubble_fraction"] = {
        "measured": block["waiting"],
        "theory": bubble_theory(grid.pp, micro_batches, schedule, first["output_len"]),
        "schedule": schedule,
        "waiting_per_stage": [sum(w) / len(w) for w in by_stage],
        "stage_busy_fraction": busy,
        "source": "waiting share of the pipeline's ranks on the profiled batch "
                  "(metrics.time_breakdown); stage_busy_fraction: time inside the stage's "
                  "layers (PipeState), which includes tensor all-reduces inside blocks",
    }
    return out


def model_metrics(plan, ranks: list[dict], metrics: dict, env: dict, reasons: dict) -> None:
    """Fill `roofline`, `model_memory_bytes` and `predicted` in `metrics` (the worker
    calls this once the per-rank metrics are aggregated)."""
    lay = run_layout(plan)
    metrics["model_memory_bytes"] = lay.memory()
    block, reason = roofline(plan, lay, metrics, env)
    metrics["roofline"] = block
    if reason:
        reasons["metrics.roofline.fraction_of_peak"] = reason
    device_name = env.get("device_name") if env.get("device") == "cuda" else None
    metrics["predicted"], why = predicted(lay, plan.grid, ranks, metrics, device_name)
    if why:
        reasons["metrics.predicted"] = why


def roofline(plan, lay: sharding.Layout, metrics: dict, env: dict):
    """The record's `metrics.roofline` block and, where a figure is null, why."""
    from gptbench import roofline as rl

    device_name = env.get("device_name") if env.get("device") == "cuda" else None
    block = rl.roofline_block(lay, device_name, metrics["tpot_ms"]["p50"])
    reason = block.pop("reason", None)
    if device_name is None:
        reason = f"{env.get('device_name') or 'this CPU'}: no known peak memory bandwidth"
    return block, reason


def rank_step_compute_s(profile: dict, phase: dict) -> float:
    """A rank's compute in its median decode step. Where the profiled batch ran eagerly
    (a compiled tensor-parallel row: tracked collectives would split its graphs), the
    compiled program's own whole step time (a second, untracked batch), its collectives
    included: the eager batch's communication is another program's (synced, unfused) and is
    not subtracted from it; `predicted` then adds no latency on top."""
    median = phase["decode_step_median"]
    marks = profile.get("compiled_marks_s")
    if not marks:
        return median["compute_s"]
    steps = [b - a for a, b in zip(marks[1:], marks[2:])]
    return statistics.median(steps) if len(steps) == profile["decode_steps"] else (
        (marks[-1] - marks[1]) / profile["decode_steps"])


def stage_compute_s(ranks: list[dict], grid, phases: list[dict]) -> list[float]:
    """Per pipeline stage, the compute (time outside collectives) of the median decode step
    of the replica batch: its slowest tensor rank, mean over data-parallel replicas."""
    ordered = sorted(ranks, key=lambda r: r["rank"])
    per_rank = {r["rank"]: rank_step_compute_s(r["profile"], p) for r, p in zip(ordered, phases)}
    out = []
    for s in range(grid.pp):
        replicas = [max(per_rank[grid.rank(s, d, t)] for t in range(grid.tp))
                    for d in range(grid.dp)]
        out.append(sum(replicas) / len(replicas))
    return out


def predicted(lay: sharding.Layout, grid, ranks: list[dict], metrics: dict,
              device_name: str | None = None):
    """(`metrics.predicted`, None) or (None, why)."""
    from gptbench import roofline as rl

    profiles = _profiles(ranks)
    if profiles is None:
        return None, "needs the profiled batch (engine.profile_comm)"
    block, phases = breakdown.time_breakdown(profiles)
    if any(p["decode_step_median"]["compute_s"] is None for p in phases):
        return None, "the profiled batch has no decode step (output_len >= 2 needed)"
    compute = stage_compute_s(ranks, grid, phases)
    entries = _latency_entries(lay, sorted(ranks, key=lambda r: r["rank"]))
    lookup = latency.LatencyTable(entries).lookup_us
    latency_source = ("probed after the profiled batch on this run's own groups "
                      "(trackers/latency.py, as gptbench diagnose --comm): from the last "
                      "participant's issue to the return, median of 20")
    seen = sum(sum((f["decode_step_calls"] or {}).values()) for f in block["per_rank"])
    compiled_marks = any(r["profile"].get("compiled_marks_s") for r in ranks)
    if lay.collectives() and compiled_marks:
        lookup = lambda *a: 0.0  # noqa: E731
        latency_source = ("none added: the compiled step's measured time holds its own "
                          "collectives (the eagerly profiled batch's are another program's)")
    elif lay.collectives() and not seen:
        # e.g. collectives replayed inside CUDA graphs: their time is in the compute term
        lookup = lambda *a: 0.0  # noqa: E731
        latency_source = ("none added: the profiled batch saw no collective (inside CUDA "
                          "graphs?), so the measured compute already holds them")
    out = rl.predict_tpot(
        lay, compute, lookup,
        compute_source=("measured on this run's profiled batch: time outside collectives "
                        "in its median decode step (a stage's slowest tensor rank, mean over "
                        "replicas), taken as given, whatever the engine; "
                        + ("a compiled tensor-parallel row: the compiled batch's whole "
                           "step time, its collectives included"
                           if compiled_marks
                           else "the profiled batch ran the timed program")),
        latency_source=latency_source)
    out["latencies"] = entries
    out["bytes_per_decode_step"] = lay.stage_step_bytes()
    device = rl.match_device(device_name) if device_name else None
    out["device_bandwidth_gbps"] = device.memory_bandwidth_bytes_per_s / 1e9 if device else None
    out["bandwidth_bound_tpot_ms"] = rl.layout_bound_s(device, lay) * 1e3 if device else None
    measured = (metrics.get("tpot_ms") or {}).get("p50")
    out["measured_tpot_ms_p50"] = measured
    out["measured_over_predicted"] = measured / out["tpot_ms"] if measured and out["tpot_ms"] else None
    return out, None
