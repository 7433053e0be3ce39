"""One rank's measurements: parity probe, timed iterations, then one profiled batch
(gptbench/figures.py turns the gathered ranks into the record's derived figures).

The time breakdown is taken on a separate profiled batch after the timed iterations: its
tracker synchronises the device around every collective, which would perturb the timed
numbers on a GPU. After it, the latency of each kind of collective the run makes is
probed on the run's own groups (trackers/latency.py), for the predicted TPOT.
The pipeline's per-stage busy time (PipeState.profile / busy_s) is taken on that same batch.
"""
from __future__ import annotations

import contextlib
import socket
import time

import torch

from gptbench import parity, progress, runner, sharding
from gptbench.trackers import latency
from gptbench.trackers.comm import CommTracker
from gptbench.trackers.gpu_util import sampler_for
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
            progress.phase("parity probe")
            tokens, logits, _ = runner.generate_batch(gen, probe, cfg.parity.tokens)
            if ref is not None:
                out["parity"] = parity.compare(ref[0], ref[1], tokens, logits, plan.dtype,
                                               cfg.parity.tolerance)

        memory = MemoryTracker(device)
        sampler = sampler_for(device)  # only the GPU this rank uses; none on CPU
        memory.reset()
        sampler.start()
        progress.phase("warm-up")
        barrier = progress.counting_barrier(_barrier, len(batches), cfg.workload.iterations)
        timing = runner.run_timed(gen, batches, cfg.workload.output_len,
                                  cfg.workload.iterations, cfg.workload.warmup,
                                  barrier=barrier, sync=sync, hook=inject)
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
            device_used_bytes=memory.device_used_bytes(),
            memory_kind=memory.kind,
        )
        out["gpu_util_pct"], out["gpu_util_reason"] = sampler.result()
        if cfg.engine.profile_comm:
            progress.phase("profiling one batch")
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
    progress.phase("gathering results")
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
            "comm_timing": comm.method, "comm_timing_error": comm.timing_error,
            "busy_s": state.busy_s if state is not None else None}


def _probe_keys(lay: sharding.Layout) -> list[tuple[str, int]]:
    """(op, bytes) to probe: each kind of collective the run makes, at its smallest and
    largest message (latency is interpolated between)."""
    sizes: dict[str, set] = {}
    for c in lay.collectives():
        sizes.setdefault(c.op, set()).add(c.nbytes)
    if lay.schedule == "in_flight":  # its busiest stage finds its inputs waiting
        sizes["p2p_ready"] = sizes["p2p"]
    return [(op, n) for op in sorted(sizes) for n in sorted({min(sizes[op]), max(sizes[op])})]


def probe_latencies(lay: sharding.Layout, grid, device) -> dict:
    """This rank's median seconds per probe, keyed "op:bytes" (None where it took no
    part). Every rank runs the same probes in the same order (they are collective)."""
    made: dict = {}
    out = {}
    world = [list(range(grid.world_size))]
    for op, nbytes in _probe_keys(lay):
        if op in ("p2p", "p2p_ready"):
            pairs = [(grid.rank(0, d, t), grid.rank(1, d, t))
                     for d in range(grid.dp) for t in range(grid.tp)]
            value = latency.probe_p2p(pairs, nbytes, device, ready=op == "p2p_ready")
        else:
            groups = {"all_reduce": grid.tp_groups(), "broadcast": grid.pp_groups(),
                      "barrier": world}[op]
            value = latency.probe_group_op(op, groups, nbytes, device, made=made)
        out[f"{op}:{nbytes}"] = value
    return out
