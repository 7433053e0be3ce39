"""The record's figures derived from every rank's measurements: the time breakdown and the
pipeline bubble (results.aggregate_metrics calls `profile_metrics`), the roofline, the
model's memory per rank and the predicted TPOT (the worker calls `model_metrics`), the
timed passes, per-batch figures, their intervals, the energy and the run's validity (the
worker calls `quality_metrics`).
"""
from __future__ import annotations

import statistics

from gptbench import sharding, stats
from gptbench.measure import run_layout
from gptbench.trackers import breakdown, energy, latency


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


def rank_step_compute_s(profile: dict, phase: dict, timed_tpot_s: list | None = None) -> float:
    """A rank's compute in its median decode step. Where the profiled batch ran eagerly
    (a compiled tensor-parallel row: tracked collectives would split its graphs), the
    compiled program's own whole step time, its collectives included: the median of its
    timed steps (`timed_tpot_s`, unpipelined rows) or of a second, untracked batch; the
    eager batch's communication is another program's (synced, unfused) and is not
    subtracted from it, and `predicted` then adds no latency on top. Else, with
    `timed_tpot_s`, their median less the profiled median step's time in collectives and
    waiting (many steps of the program timed, not one profiled batch); else the profiled
    median step's compute."""
    median = phase["decode_step_median"]
    if timed_tpot_s:
        return max(0.0, statistics.median(timed_tpot_s) - median["communication_s"]
                   - median["waiting_s"])
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
    per_rank = {r["rank"]: rank_step_compute_s(r["profile"], p,
                                               r.get("tpot_s") if grid.pp == 1 else None)
                for r, p in zip(ordered, phases)}
    out = []
    for s in range(grid.pp):
        replicas = [max(per_rank[grid.rank(s, d, t)] for t in range(grid.tp))
                    for d in range(grid.dp)]
        out.append(sum(replicas) / len(replicas))
    return out


def stage_prefill_s(ranks: list[dict], grid, phases: list[dict]) -> list[float] | None:
    """Per pipeline stage, the prefill's compute (time outside collectives) on the profiled
    batch: its slowest tensor rank, mean over replicas; None where a rank has none."""
    ordered = sorted(ranks, key=lambda r: r["rank"])
    per_rank = {r["rank"]: (p.get("prefill") or {}).get("compute_s") for r, p in zip(ordered, phases)}
    if any(v is None for v in per_rank.values()):
        return None
    return [sum(max(per_rank[grid.rank(s, d, t)] for t in range(grid.tp))
                for d in range(grid.dp)) / grid.dp for s in range(grid.pp)]


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
    from gptbench import predict

    out = predict.predict(
        lay, stage_prefill_s(ranks, grid, phases), compute, lookup,
        compute_source=("measured on this run: unpipelined, the median of every timed "
                        "decode step less the profiled batch's median step's time in "
                        "collectives and waiting; pipelines, time outside collectives in the "
                        "profiled batch's median decode step (a stage's slowest tensor rank, "
                        "mean over replicas), taken as given, whatever the engine; "
                        + ("a compiled tensor-parallel row: the compiled program's whole "
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
    ttft = (metrics.get("ttft_ms") or {}).get("p50")
    out["measured_ttft_over_predicted"] = ttft / out["ttft_ms"] if ttft and out["ttft_ms"] else None
    return out, None


def _compact(value: float) -> float:
    return float(f"{value:.6g}")


def batch_figures(ranks: list[dict]) -> dict:
    """One entry per timed batch of the run (a batch index: every replica's batch of that
    index ran together, between two barriers): tokens of all replicas, wall seconds of the
    slowest rank, TTFT and TPOT values pooled over the replicas."""
    outputs = [r for r in ranks if r["is_output"]]
    per_pass = ranks[0]["batches_per_pass"]
    n = len(ranks[0]["e2e_s"])
    tokens = [sum(r["iteration_tokens"][j // per_pass] // per_pass for r in outputs)
              for j in range(n)]
    wall = [max(r["e2e_s"][j] for r in ranks) for j in range(n)]
    ttft = [[x * 1e3 for r in outputs for x in r["batch_ttft_s"][j]] for j in range(n)]
    tpot = [[x * 1e3 for r in outputs for x in r["batch_tpot_s"][j]] for j in range(n)]
    return {"tokens": tokens, "wall_s": wall, "ttft_ms": ttft, "tpot_ms": tpot}


def intervals(metrics: dict, figures: dict, reasons: dict) -> dict | None:
    """`metrics.intervals`: 95 % bootstrap intervals over the timed batches of throughput
    (the ratio tokens / seconds, resampled, scaled to the run's throughput: the batches'
    walls leave out the barriers between them), TTFT p50 and TPOT p50."""
    n = len(figures["wall_s"])
    if n < 2:
        reasons["metrics.intervals"] = f"needs at least 2 timed batches, the run has {n}"
        return None
    factors = stats.ratio_factors(figures["tokens"], figures["wall_s"])
    out = {"method": stats.METHOD, "confidence": stats.CONFIDENCE,
           "resamples": stats.RESAMPLES, "seed": stats.SEED, "batches": n,
           "throughput_tokens_per_s": [metrics["throughput_tokens_per_s"] * f
                                       for f in stats.percentile_interval(factors)]}
    for key in ("ttft_ms", "tpot_ms"):
        groups = figures[key]
        if not any(groups):
            out[f"{key}_p50"] = None
            reasons[f"metrics.intervals.{key}_p50"] = "no values (output_len 1 has no decode step)"
            continue
        out[f"{key}_p50"] = stats.percentile_interval(stats.pooled_percentile_bootstrap(groups, 50))
    return out


def validity(cfg, grid, ranks: list[dict], metrics: dict) -> dict:
    """`metrics.validity`: "valid", or "invalid" with every reason found."""
    w = cfg.workload
    why, checks = [], {}
    asked = w.iterations * w.num_samples * grid.dp * w.output_len
    checks["timed_tokens"] = {"generated": metrics["generated_tokens"], "asked": asked}
    if metrics["generated_tokens"] < asked:
        why.append(f"{metrics['generated_tokens']} timed tokens, fewer than the {asked} asked "
                   "(iterations x num_samples x replicas x output_len)")
    passes = metrics["timed_passes"]
    if passes["stopped_by"] == "timeout_bound":
        why.append(f"timed passes stopped at the timeout bound (half of timeout_s) after "
                   f"{passes['wall_s']:.1f} s, short of workload.min_duration_s={w.min_duration_s:g}")
    cv = metrics.get("throughput_cv_pct")
    checks["throughput_cv_pct"] = {"value": cv, "max": w.max_cv_pct}
    if cv is not None and cv > w.max_cv_pct:
        why.append(f"pass-to-pass throughput CV {cv:.1f} % above workload.max_cv_pct "
                   f"{w.max_cv_pct:g} %")
    graphs = [r.get("graphs_in_timed_passes") for r in ranks]
    checks["graphs_in_timed_passes"] = None if None in graphs else max(graphs)
    if checks["graphs_in_timed_passes"]:
        why.append(f"{checks['graphs_in_timed_passes']} graph(s) compiled inside the timed "
                   "passes: the timings include compilation")
    hosts: dict = {}
    for r in ranks:
        loads = [x for x in r.get("load_avg_1m") or [] if x is not None]
        host = hosts.setdefault(r.get("host"), {"load_avg_1m_max": None, "cpu_count": r.get("cpu_count"),
                                                "ranks": 0})
        host["ranks"] += 1
        if loads:
            host["load_avg_1m_max"] = max(loads + [host["load_avg_1m_max"] or 0.0])
    checks["load"] = [{"host": h, **v} for h, v in hosts.items()]
    for h, v in hosts.items():
        if v["load_avg_1m_max"] is not None and v["cpu_count"] and v["load_avg_1m_max"] > v["cpu_count"]:
            why.append(f"load average {v['load_avg_1m_max']:g} on {h} with {v['cpu_count']} CPUs "
                       "at the edges of the timed passes: more runnable threads than cores, "
                       "the run shared its cores")
    return {"verdict": "invalid" if why else "valid", "reasons": why, "checks": checks}


def quality_metrics(plan, ranks: list[dict], metrics: dict, reasons: dict) -> None:
    """Fill `timed_passes`, `batches` (compact), `intervals`, `energy` and `validity` in
    `metrics` (the worker calls this once the per-rank metrics are aggregated)."""
    w = plan.cfg.workload
    first = ranks[0]["timed_passes"]
    metrics["timed_passes"] = {"count": first["count"], "wall_s": metrics["timed_wall_s"],
                               "min_iterations": w.iterations, "min_duration_s": w.min_duration_s,
                               "stopped_by": first["stopped_by"],
                               "per_rank_count": [r["timed_passes"]["count"] for r in ranks]}
    figures = batch_figures(ranks)
    metrics["batches"] = {
        "tokens": figures["tokens"], "wall_s": [_compact(x) for x in figures["wall_s"]],
        **{f"{key}_p50": [_compact(stats.percentile(sorted(g), 50)) if g else None
                          for g in figures[key]] for key in ("ttft_ms", "tpot_ms")},
        "source": "per timed batch: tokens of all replicas, the slowest rank's seconds, "
                  "the batch's TTFT and TPOT p50 over replicas"}
    metrics["intervals"] = intervals(metrics, figures, reasons)
    metrics["energy"], why = energy.energy_block(ranks, metrics["generated_tokens"])
    if why:
        reasons["metrics.energy"] = why
    metrics["validity"] = validity(plan.cfg, plan.grid, ranks, metrics)
