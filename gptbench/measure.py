"""One rank's measurements: parity probe, timed iterations, then one profiled batch
(gptbench/figures.py turns the gathered ranks into the record's derived figures).

The time breakdown is taken on a separate profiled batch after the timed iterations: its
tracker (trackers/comm.py) wraps every collective, on CPU in device syncs, on CUDA issuing
it non-blocking to read its NCCL kernel time, which would perturb the timed numbers. After it, the latency of each kind of collective the run makes is
probed on the run's own groups (trackers/latency.py), for the predicted TPOT.
The pipeline's per-stage busy time (PipeState.profile / busy_s) is taken on that same batch.
"""
from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time

import torch

from gptbench import parity, progress, runner, sharding
from gptbench.compiled import CompileStats, snapshot
from gptbench.trackers import decode_profile, energy, latency
from gptbench.trackers.comm import CommTracker
from gptbench.trackers.gpu_util import sampler_for
from gptbench.trackers.memory import MemoryTracker
from gptbench.trackers.timing import Stamps


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
        region = TimedRegion(energy.meter_for(device))
        memory.reset()
        sampler.start()
        progress.phase("warm-up")
        barrier = region.starting(
            progress.counting_barrier(_barrier, len(batches), cfg.workload.iterations))
        rule = ContinueRule(cfg.workload.min_duration_s, pass_deadline(cfg.timeout_s), device)
        timing = runner.run_timed(gen, batches, cfg.workload.output_len,
                                  cfg.workload.iterations, cfg.workload.warmup,
                                  barrier=barrier, device=device, hook=inject,
                                  keep_going=rule if cfg.workload.min_duration_s > 0 else None)
        region.stop()
        sampler.stop()
        memory.stop()

        out.update(
            ttft_s=[x for b in timing.batches for x in b.ttfts_s],
            tpot_s=[x for b in timing.batches for x in b.tpot_s],
            e2e_s=[b.e2e_s for b in timing.batches],
            batch_ttft_s=[b.ttfts_s for b in timing.batches],
            batch_tpot_s=[b.tpot_s for b in timing.batches],
            batches_per_pass=len(batches),
            timed_passes={"count": len(timing.iteration_wall_s), "stopped_by": rule.stopped_by},
            **region.facts(),
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
        out["energy"], out["energy_reason"] = region.meter.result()
        progress.phase("profiling decode steps")
        out["decode_profile"], out["decode_profile_reason"] = decode_profile.profile(
            gen, batches[0], device, decode_floor_s(plan),
            statistics.median(out["tpot_s"]) if out["tpot_s"] else None)
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


class TimedRegion:
    """What is read at the edges of the timed passes (after the warm-up, at the first timed
    barrier; after the last pass): the GPU's energy counter, the load average, torch's
    compile counters."""

    def __init__(self, meter: energy.EnergyMeter):
        self.meter = meter
        self.load_avg_1m: list[float | None] = []
        self._compile = None

    def starting(self, barrier):
        """`barrier`, which opens the region on its first call."""
        def first_then_barrier():
            if self._compile is None:
                self._compile = snapshot()
                self.load_avg_1m.append(_load_avg_1m())
                self.meter.start()
            barrier()
        return first_then_barrier

    def stop(self) -> None:
        self.meter.stop()
        self.load_avg_1m.append(_load_avg_1m())

    def facts(self) -> dict:
        graphs = CompileStats.since(self._compile).graphs if self._compile else None
        return {"load_avg_1m": self.load_avg_1m, "cpu_count": os.cpu_count(),
                "graphs_in_timed_passes": graphs}


def _load_avg_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def pass_deadline(timeout_s: float) -> float:
    """Wall-clock time (time.time()) after which no timed pass is added for
    workload.min_duration_s: half of timeout_s after this rank's process started, leaving
    the rest for the profiled batch and the record."""
    import psutil

    return psutil.Process().create_time() + timeout_s / 2


class ContinueRule:
    """`keep_going` for runner.run_timed: another pass while this rank's timed passes add
    up to less than `min_duration_s`, unless that pass would end after `deadline`. The
    decision is collective: one all-reduce (MAX) of two flags over the world group per
    pass, so every rank runs the same number of passes and none waits in a barrier that
    the others have left. (DeepSpeed's CPU shm all-reduce, which ignores groups, is off;
    the world group would be right for it anyway.)"""

    def __init__(self, min_duration_s: float, deadline: float, device, clock=time.time):
        self.min_duration_s, self.deadline = min_duration_s, deadline
        self.device, self.clock = device, clock
        self.stopped_by = "iterations"  # iterations | min_duration | timeout_bound
        self.added = 0  # passes added beyond the iterations

    def __call__(self, timing) -> bool:
        short = timing.timed_wall_s < self.min_duration_s
        late = self.clock() + timing.iteration_wall_s[-1] > self.deadline
        flags = torch.tensor([float(short), float(late)], device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        short, late = bool(flags[0]), bool(flags[1])
        if not short:
            self.stopped_by = "min_duration" if self.added else "iterations"
        elif late:
            self.stopped_by = "timeout_bound"
        self.added += short and not late
        return short and not late


def decode_floor_s(plan) -> float | None:
    """Seconds this run's slowest rank needs per decode step to read its bytes at the
    device's bandwidth (gptbench/roofline.py), where the device is known."""
    from gptbench.roofline import match_device

    if plan.device.type != "cuda":
        return None
    spec = match_device(torch.cuda.get_device_name(plan.device))
    if spec is None:
        return None
    lay = run_layout(plan)
    return lay.decode_step_bytes(lay.slowest()) / spec.memory_bandwidth_bytes_per_s


def batch_marks(gen, ids, output_len: int, device) -> tuple[list[float], int]:
    """Run one batch; return (marks, decode steps): host clock readings of the batch's start,
    the end of the prefill (the start of the decode), then the end of each decode step, or
    only the batch's end where the generator runs its own loop (`generate_timed`: the
    in-flight pipeline, where micro-batches are at different steps; Hugging Face
    `generate`). Host readings (trackers/timing.py Stamps in host mode, on every device):
    they are aligned with the collectives the profiled batch logs."""
    stamps = Stamps(device, host=True)
    decode_hooks: list[float] = []

    def hook(point: str) -> None:  # the in-flight schedule calls "decode" once, at step 1
        if point == "decode":
            decode_hooks.append(time.perf_counter())

    _, _, timing = runner.generate_batch(gen, ids, output_len, stamps, hook=hook)
    readings = stamps.readings  # every rank takes at least its start and its end
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
