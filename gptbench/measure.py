"""One rank's measurements: parity probe, timed iterations, then one profiled batch.

Communication is timed on a separate profiled batch after the timed iterations: its
wrappers synchronise the device around every collective, which would perturb the timed
numbers on a GPU. The pipeline's per-stage busy time is taken on that same batch.
"""
from __future__ import annotations

import contextlib
import time

import torch

from gptbench import parity, progress, runner
from gptbench.trackers.comm import CommTracker
from gptbench.trackers.gpu_util import sampler_for
from gptbench.trackers.memory import MemoryTracker
from gptbench.trackers.timing import synchronize


def _barrier():
    torch.distributed.barrier()


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
                out.update(_profile(gen, batches[0], cfg.workload.output_len, device, info))
            out["profile_eager"] = eager
    progress.phase("gathering results")
    return out


def _profile(gen, ids, output_len: int, device, info: dict) -> dict:
    state = info.get("pipe_state")
    _barrier()
    if state is not None:
        state.busy_s, state.profile = 0.0, True
    with CommTracker(device) as comm:
        synchronize(device)
        start = time.perf_counter()
        runner.generate_batch(gen, ids, output_len)
        synchronize(device)
        wall_s = time.perf_counter() - start
    if state is not None:
        state.profile = False
    return {"comm_s": comm.seconds_total, "comm_by_op": {k: vars(v) for k, v in comm.by_op.items()},
            "profile_wall_s": wall_s, "busy_s": state.busy_s if state is not None else None}


def roofline(plan, model: dict, metrics: dict, env: dict):
    """The record's `metrics.roofline` block and, where a figure is null, why."""
    from gptbench import roofline as rl
    from gptbench.plan import rank_fractions

    w, g = plan.cfg.workload, plan.grid
    workload = {"dtype": str(plan.dtype).replace("torch.", ""), "batch_size": w.batch_size,
                "input_len": w.input_len, "output_len": w.output_len}
    device_name = env.get("device_name") if env.get("device") == "cuda" else None
    dims = rl.ModelDims.of(model)
    # The fullest rank: embeddings stay whole under AutoTP and heads split unevenly.
    weight_share, kv_share = rank_fractions(dims, g.tp, g.pp, plan.cfg.topology.partition_method)
    block = rl.roofline_block(model, workload, device_name, metrics["tpot_ms"]["p50"],
                              weight_share, per_rank_kv_fraction=kv_share, dp=g.dp, pp=g.pp,
                              micro_batches=plan.micro_batches)
    reason = block.pop("reason", None)
    if device_name is None:
        reason = f"{env.get('device_name') or 'this CPU'}: no known peak memory bandwidth"
    return block, reason
