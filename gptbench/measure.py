"""One rank's measurements: parity probe, timed iterations, then one profiled batch; and
the record's model-side figures (time breakdown, roofline, model memory, predicted TPOT).

The time breakdown is taken on a separate profiled batch after the timed iterations: its
tracker synchronises the device around every collective, which would perturb the timed
numbers on a GPU. After it, the latency of each kind of collective the run makes is
probed on the run's own groups (trackers/latency.py), for the predicted TPOT.
The pipeline's per-stage busy time (PipeState.profile / busy_s) is taken on that same batch.
"""
from __future__ import annotations

import contextlib
import socket
import statistics
import time

import torch

from gptbench import parity, runner, sharding
from gptbench.trackers import breakdown, latency
from gptbench.trackers.comm import CommTracker
from gptbench.trackers.gpu_util import GpuUtilSampler
from gptbench.trackers.memory import MemoryTracker
from gptbench.trackers.timing import synchronize


def _barrier():
    torch.distributed.barrier()


def schedule_of(cfg, pp: int) -> str:
    """The pipeline schedule a run uses (topology.pipeline_schedule; flush where the
    config has none); "none" without a pipeline."""
    if pp <= 1:
        return "none"
    return getattr(cfg.topology, "pipeline_schedule", None) or "flush"


def run_layout(plan) -> sharding.Layout:
    """The sharding model of this run (one replica)."""
    from gptbench.roofline import DTYPE_BYTES, ModelDims

    w, g = plan.cfg.workload, plan.grid
    dtype = str(plan.dtype).replace("torch.", "")
    return sharding.layout(ModelDims.of(plan.model_dims), g.dp, g.tp, g.pp, plan.micro_batches,
                           w.batch_size, w.input_len, w.output_len, DTYPE_BYTES[dtype],
                           schedule_of(plan.cfg, g.pp), plan.cfg.topology.partition_method)


def measure_rank(gen, batches, probe, ref, plan, rank: int, inject, info: dict) -> dict:
    cfg, device = plan.cfg, plan.device
    sync = lambda: synchronize(device)  # noqa: E731
    out: dict = {"rank": rank, "coords": list(plan.grid.coords(rank)), "parity": None}

    with torch.no_grad():
        if cfg.parity.enabled:
            tokens, logits, _ = runner.generate_batch(gen, probe, cfg.parity.tokens)
            if ref is not None:
                out["parity"] = parity.compare(ref[0], ref[1], tokens, logits, plan.dtype,
                                               cfg.parity.tolerance)

        memory = MemoryTracker(device)
        sampler = GpuUtilSampler(device.index or 0)
        memory.reset()
        sampler.start()
        timing = runner.run_timed(gen, batches, cfg.workload.output_len,
                                  cfg.workload.iterations, cfg.workload.warmup,
                                  barrier=_barrier, sync=sync, hook=inject)
        sampler.stop()
        memory.stop()

        out.update(
            ttft_s=[x for b in timing.batches for x in b.ttfts_s],
            tpot_s=[x for b in timing.batches for x in b.tpot_s],
            e2e_s=[b.e2e_s for b in timing.batches],
            iteration_wall_s=timing.iteration_wall_s,
            iteration_tokens=timing.iteration_tokens,
            timed_wall_s=timing.timed_wall_s,
            generated_tokens=timing.generated_tokens,
            decode_input_lens=sorted(timing.decode_input_lens),
            peak_memory_bytes=memory.peak_bytes(),
            peak_reserved_bytes=memory.peak_reserved_bytes(),
            memory_kind=memory.kind,
        )
        out["gpu_util_pct"], out["gpu_util_reason"] = sampler.result()
        if cfg.engine.profile_comm:
            # The tracker wraps DeepSpeed's collectives in timed Python calls; inside a
            # compiled tensor-parallel graph each would split the graph (a different program
            # than the one timed). So such a batch runs eagerly, and is labelled so.
            eager = plan.compile_mode != "off" and plan.grid.tp > 1
            with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                out["profile"] = _profile(gen, batches[0], cfg.workload.output_len, device, info)
            out["profile_eager"] = eager
            if eager:  # the compiled program's own step time, for the predicted TPOT
                _barrier()
                out["profile"]["compiled_marks_s"], _ = batch_marks(
                    gen, batches[0], cfg.workload.output_len, device)
            out["profile"]["schedule"] = schedule_of(cfg, plan.grid.pp)
            out["profile"]["latency_s"] = probe_latencies(run_layout(plan), plan.grid, device)
    return out


def batch_marks(gen, ids, output_len: int, device) -> tuple[list[float], int]:
    """Run one batch; return (marks, decode steps): the batch's start, the end of the
    prefill (the start of the decode), then the end of each decode step, or only the
    batch's end where the generator runs its own loop (`generate_timed`: the in-flight
    pipeline, where micro-batches are at different steps; Hugging Face `generate`)."""
    readings: list[float] = []
    decode_hooks: list[float] = []

    def clock() -> float:  # generate_batch reads: start, after prefill, after each step
        readings.append(time.perf_counter())
        return readings[-1]

    def hook(point: str) -> None:  # the in-flight schedule calls "decode" once, at step 1
        if point == "decode":
            decode_hooks.append(time.perf_counter())

    _, _, timing = runner.generate_batch(gen, ids, output_len, clock=clock,
                                         sync=lambda: synchronize(device), hook=hook)
    if not hasattr(gen, "generate_timed"):
        return readings, output_len - 1
    start, end = readings[0], readings[-1]
    if decode_hooks:
        decode_start = decode_hooks[0]
    elif timing.ttft_s < timing.e2e_s:
        decode_start = start + timing.ttft_s
    else:
        decode_start = end
    return [start, decode_start, end], output_len - 1


def _profile(gen, ids, output_len: int, device, info: dict) -> dict:
    """One batch with every torch.distributed call logged (trackers/comm.py)."""
    state = info.get("pipe_state")
    _barrier()
    clock_ref_s = time.perf_counter()  # just after the barrier: aligns hosts' clocks
    if state is not None:
        state.busy_s, state.profile = 0.0, True
    with CommTracker(device, log_calls=True) as comm:
        marks, steps = batch_marks(gen, ids, output_len, device)
    if state is not None:
        state.profile = False
    return {"host": socket.gethostname(), "clock_ref_s": clock_ref_s, "marks_s": marks,
            "decode_steps": steps, "output_len": output_len,
            "calls": [c.as_list() for c in comm.log],
            "comm_by_op": {k: vars(v) for k, v in comm.by_op.items()},
            "busy_s": state.busy_s if state is not None else None}


def _probe_keys(lay: sharding.Layout) -> list[tuple[str, int]]:
    """(op, bytes) to probe: each kind of collective the run makes, at its smallest and
    largest message (latency is interpolated between)."""
    sizes: dict[str, set] = {}
    for c in lay.collectives():
        sizes.setdefault(c.op, set()).add(c.nbytes)
    return [(op, n) for op in sorted(sizes) for n in sorted({min(sizes[op]), max(sizes[op])})]


def probe_latencies(lay: sharding.Layout, grid, device) -> dict:
    """This rank's median seconds per probe, keyed "op:bytes" (None where it took no
    part). Every rank runs the same probes in the same order (they are collective)."""
    made: dict = {}
    out = {}
    world = [list(range(grid.world_size))]
    for op, nbytes in _probe_keys(lay):
        if op == "p2p":
            pairs = [(grid.rank(0, d, t), grid.rank(1, d, t))
                     for d in range(grid.dp) for t in range(grid.tp)]
            value = latency.probe_p2p(pairs, nbytes, device)
        else:
            groups = {"all_reduce": grid.tp_groups(), "broadcast": grid.pp_groups(),
                      "barrier": world}[op]
            value = latency.probe_group_op(op, groups, nbytes, device, made=made)
        out[f"{op}:{nbytes}"] = value
    return out


def _latency_entries(lay: sharding.Layout, ranks: list[dict]) -> list[dict]:
    sizes = {"all_reduce": (lay.tp, lay.dp * lay.pp), "broadcast": (lay.pp, lay.dp * lay.tp),
             "barrier": (lay.dp * lay.tp * lay.pp, 1), "p2p": (2, lay.dp * lay.tp)}
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
    compiled program's own step time (a second, untracked batch) less the eager step's time
    in collectives."""
    median = phase["decode_step_median"]
    marks = profile.get("compiled_marks_s")
    if not marks:
        return median["compute_s"]
    steps = [b - a for a, b in zip(marks[1:], marks[2:])]
    per_step = statistics.median(steps) if len(steps) == profile["decode_steps"] else (
        (marks[-1] - marks[1]) / profile["decode_steps"])
    return max(0.0, per_step - median["communication_s"] - median["waiting_s"])


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
                      "(trackers/latency.py, as gptbench diagnose --comm): barrier, then "
                      "the operation, median of 20")
    seen = sum(sum((f["decode_step_calls"] or {}).values()) for f in block["per_rank"])
    if lay.collectives() and not seen:
        # e.g. collectives replayed inside CUDA graphs: their time is in the compute term
        lookup = lambda *a: 0.0  # noqa: E731
        latency_source = ("none added: the profiled batch saw no collective (inside CUDA "
                          "graphs?), so the measured compute already holds them")
    out = rl.predict_tpot(
        lay, compute, lookup,
        compute_source=("measured on this run's profiled batch: time outside collectives "
                        "in its median decode step (a stage's slowest tensor rank, mean over "
                        "replicas), taken as given, whatever the engine; "
                        + ("a compiled tensor-parallel row: the compiled batch's step time "
                           "less the eager profiled step's time in collectives"
                           if any(r["profile"].get("compiled_marks_s") for r in ranks)
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
