"""`gptbench emulate`: a multi-rank run measured on the one device you have.

Every distinct rank role of the grid (a tensor-parallel shard of a pipeline stage; data-
parallel replicas are copies, and AutoTP shards with equal head counts are one role) is
built in this process by the strategy's own `build` (the same call a rank makes), under
torch's fake process group of the run's world size at that rank's number: every
collective is a no-op that moves no data, so the shard computes exactly what its rank
would, with wrong values. The role is compiled as the real run would be, then timed with
the run's timers and warm-up: prefill and decode of an engine (data / tensor parallel:
runner.run_timed), or the pipeline stage's own function (`Stage.run`) over its micro-
batches. The roles' compute goes through the one prediction (gptbench/predict.py) with the
latencies of `--comm-file` or `--interconnect`.

Not modelled: NCCL's kernels taking SMs and HBM bandwidth from the model's while they run,
skew between ranks (stragglers, a late rank in every collective), ranks sharing cores or a
host's memory bandwidth. Parity cannot be checked (the all-reduces add nothing): an
emulated record has `parity: null` with the reason and never reports tokens.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from gptbench import results
from gptbench.errors import NotApplicable, UserError

RUN_PREFIX = "emu-"
METHOD = ("one rank role at a time in one process: the strategy's own build under torch's "
          "fake process group of the run's world size (collectives are no-ops), compiled "
          "as the run would be, timed with the run's timers and warm-up")
NOT_MODELLED = ["NCCL's use of SMs and HBM bandwidth while collectives run",
                "skew between ranks (a late rank holds every collective)",
                "ranks sharing a host's cores or memory bandwidth",
                "the per-batch barrier between replicas"]


@dataclass(frozen=True)
class Role:
    """One distinct rank role: pipeline stage `stage`, tensor ranks `tp_ranks` (equal heads)
    of which global rank `rank` (replica 0) is built."""
    stage: int
    tp_ranks: tuple[int, ...]
    rank: int
    heads: int


def roles(grid, n_head: int) -> list[Role]:
    from gptbench.autotp import heads_per_rank

    heads = heads_per_rank(n_head, grid.tp)
    out = []
    for s in range(grid.pp):
        by_heads: dict[int, list[int]] = {}
        for t in range(grid.tp):
            by_heads.setdefault(heads[t], []).append(t)
        out += [Role(s, tuple(ts), grid.rank(s, 0, ts[0]), h) for h, ts in by_heads.items()]
    return out


def signature(plan, role: Role) -> tuple:
    """What a role's timing depends on: two rows with equal signatures share one timing
    (1/2/4-rank data parallel are one role; so are the stages of pp and pp x dp)."""
    cfg, g, w = plan.cfg, plan.grid, plan.cfg.workload
    dims = tuple(sorted((k, str(v)) for k, v in plan.model_dims.items()))
    pipeline = g.pp > 1
    return (cfg.strategy if not pipeline else "pipeline", cfg.engine.backend, dims,
            str(plan.dtype), plan.device.type,
            plan.threads if plan.device.type == "cpu" else None,  # a GPU rank's host threads
            plan.compile_mode, g.tp, g.pp,
            role.stage, role.heads, plan.micro_batches if pipeline else 1,
            cfg.topology.partition_method if pipeline else None, w.batch_size, w.input_len,
            w.output_len, w.iterations, w.warmup)


def fake_world(rank: int, world: int) -> None:
    """This process as rank `rank` of `world` under torch's fake process group, with
    DeepSpeed's communication on top of it (as the worker sets it up)."""
    import deepspeed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist = torch.distributed
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      LOCAL_SIZE=str(world))
    # DeepSpeed's CPU shm all-reduce ignores process groups and would really communicate
    # (through shared memory with ranks that do not exist): keep it off, as the worker does.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")


def _sync(device):
    from gptbench.trackers.timing import synchronize

    synchronize(device)


def _tensors_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _cache_tensors(caches):
    """K and V tensors of gptbench's step caches (step.KVCache) or Hugging Face caches."""
    for cache in caches:
        cache = getattr(cache, "cache", cache)  # the eager pipeline's holder (_HFCache)
        if hasattr(cache, "k"):
            yield from (*cache.k, *cache.v)
        for layer in getattr(cache, "layers", []):
            yield from (getattr(layer, "keys", None), getattr(layer, "values", None))


def _role_caches(gen) -> list:
    stage = getattr(gen, "stage", None)
    if stage is not None:
        return list(stage.active)
    caches = list(getattr(gen, "caches", {}).values())
    return caches or [c for c in [getattr(gen, "cache", None)] if c is not None]


def _time_engine(gen, plan, batches) -> tuple[list[float], list[float]]:
    """(prefill s per batch, decode s per step) of a data / tensor parallel engine."""
    from gptbench import runner

    w = plan.cfg.workload
    timing = runner.run_timed(gen, batches, w.output_len, w.iterations, w.warmup,
                              barrier=lambda: None, sync=lambda: _sync(plan.device))
    return [b.ttft_s for b in timing.batches], [x for b in timing.batches for x in b.tpot_s]


def _time_stage(gen, plan, batches) -> tuple[list[float], list[float]]:
    """(prefill s of the whole batch, decode s per step: all m micro-batch ticks) of one
    pipeline stage, through the stage function the schedule calls (`Stage.run`)."""
    stage, m, w = gen.stage, gen.m, plan.cfg.workload
    ids = batches[0]
    mb, length = ids.shape[0] // m, ids.shape[1]
    d = plan.model_dims["n_embd"]

    def inputs(tokens: int):
        if stage.role.is_first:  # token ids (mb, T)
            return [ids[k * mb:(k + 1) * mb, :tokens] for k in range(m)]
        return [torch.randn((mb, tokens, d), dtype=plan.dtype, device=plan.device)
                for _ in range(m)]  # hidden states (mb, T, d)

    first, step = inputs(length), inputs(1)

    def timed(x, k) -> float:
        _sync(plan.device)
        t0 = time.perf_counter()
        stage.run(x, k)
        _sync(plan.device)
        return time.perf_counter() - t0

    prefill, decode = [], []
    with torch.no_grad():
        for i in range(w.warmup + w.iterations * len(batches)):  # as many as run_timed
            stage.begin(mb, m)
            p = sum(timed(first[k], k) for k in range(m))
            steps = [sum(timed(step[k], k) for k in range(m)) for _ in range(w.output_len - 1)]
            if i >= w.warmup:
                prefill.append(p)
                decode += steps
    return prefill, decode


def build_role(plan, role: Role):
    """(generator, strategy info, unsharded params) of `role`, built by the strategy's own
    `build` (the call a rank makes) under the fake world of the run's size."""
    from gptbench import worker
    from gptbench.strategies import REGISTRY
    from gptbench.strategies.base import RankContext

    grid, device = plan.grid, plan.device
    # Each rank is its own process: nothing compiled for an earlier role is reused (and
    # roles sharing a code object would otherwise run into dynamo's recompile limit).
    torch._dynamo.reset()
    fake_world(role.rank, grid.world_size)
    torch.set_grad_enabled(False)  # AutoTP's RowParallel refuses its in-place bias add otherwise
    torch.set_num_threads(plan.threads)
    model = plan.load_model()
    params = sum(p.numel() for p in model.parameters())
    tp_group, tp_ranks = (worker.make_groups(grid, role.rank) if grid.tp > 1
                          else (None, [role.rank]))
    ctx = RankContext(cfg=plan.cfg, grid=grid, rank=role.rank, device=device, dtype=plan.dtype,
                      model=model, tp_group=tp_group, tp_ranks=tp_ranks,
                      info={"micro_batches": plan.micro_batches, "params": params,
                            "compile_mode": plan.compile_mode,
                            "inductor": worker.inductor_options(plan)})
    gen = REGISTRY[plan.cfg.strategy](ctx)
    del model, ctx.model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if worker._shm_allreduce_active():
        raise RuntimeError("DeepSpeed's shm all-reduce is on: it would communicate for real")
    return gen, ctx.info, params


def warm_up(gen, plan, ids) -> None:
    """Compile every shape the timing will see, untimed (worker.compile_warmup's rule: each
    shape WARMUP_CALLS times); a pipeline stage compiles on its own (Stage.precompile)."""
    from gptbench import runner, worker
    from gptbench.compiled import WARMUP_CALLS, compiling

    if plan.compile_mode == "off":
        return
    with torch.no_grad(), compiling(worker.inductor_options(plan)):
        if hasattr(gen, "stage"):
            gen.precompile(ids)
            return
        for _ in range(WARMUP_CALLS):
            runner.generate_batch(gen, ids, min(plan.cfg.workload.output_len, WARMUP_CALLS))


def time_role(plan, role: Role) -> dict:
    """Build `role`, compile it as the run would, time it. Returns its compute (ms) and
    memory."""
    from gptbench import worker
    from gptbench.compiled import CompileStats, compiling, measuring, snapshot

    device = plan.device
    gen, info, params = build_role(plan, role)
    batches = plan.batches(role.rank)
    start = snapshot()
    wall = time.perf_counter()
    pipeline = hasattr(gen, "stage")
    warm_up(gen, plan, batches[0])
    compiled = CompileStats.since(start)
    warmup_wall_s = time.perf_counter() - wall
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    options = worker.inductor_options(plan)
    with compiling(options), measuring(options):  # as the worker measures a compiled run
        prefill, decode = (_time_stage if pipeline else _time_engine)(gen, plan, batches)
    tensors = list(gen.module.parameters()) + list(gen.module.buffers())
    shard_bytes = _tensors_bytes(tensors) + _tensors_bytes(_cache_tensors(_role_caches(gen)))
    if device.type == "cuda":
        memory = {"bytes": torch.cuda.max_memory_allocated(device),
                  "source": "torch.cuda.max_memory_allocated over the role's timed steps"}
    else:
        memory = {"bytes": shard_bytes, "source": "the shard's parameters, buffers and KV "
                                                  "cache tensors (unique storages)"}
    out = {"stage": role.stage, "tp_ranks": list(role.tp_ranks), "rank": role.rank,
           "unsharded_params": params,
           "heads": role.heads, "params": sum(p.numel() for p in gen.module.parameters()),
           "prefill_ms": statistics.median(prefill) * 1e3,
           "decode_ms": statistics.median(decode) * 1e3,
           "prefill_samples": len(prefill), "decode_samples": len(decode),
           "memory_bytes": memory["bytes"], "memory_source": memory["source"],
           "compile": {"mode": plan.compile_mode, "compile_s": compiled.compile_s,
                       "graph_breaks": compiled.graph_breaks, "graphs": compiled.graphs,
                       "warmup_wall_s": warmup_wall_s},
           "info": {k: info.get(k) for k in ("heads_per_tp_rank", "stage_layers",
                                                 "pipe_topology", "pipeline_schedule")}}
    del gen
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def scope(plan) -> dict:
    """Whether this machine can stand for the run: on CPU the real ranks would each have
    their threads on their own cores; past the cores they share them, which one role
    timed alone does not see."""
    if plan.device.type != "cpu":
        return {"in_scope": True, "reason": None}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    need = plan.grid.world_size * plan.threads
    if need > cores:
        return {"in_scope": False,
                "reason": f"{plan.grid.world_size} ranks x {plan.threads} thread(s) = {need} "
                          f"> {cores} cores: the real ranks share cores, one role timed "
                          "alone does not (core sharing not modelled)"}
    return {"in_scope": True, "reason": None}


def stage_figures(plan, timed: list[dict]) -> tuple[list[float], list[float]]:
    """Per stage, the slowest role's (prefill s, decode s)."""
    pre = [max(r["prefill_ms"] for r in timed if r["stage"] == s) / 1e3
           for s in range(plan.grid.pp)]
    dec = [max(r["decode_ms"] for r in timed if r["stage"] == s) / 1e3
           for s in range(plan.grid.pp)]
    return pre, dec


def fits(memory_bytes: int, device_name: str | None) -> dict:
    from gptbench.roofline import match_device

    spec = match_device(device_name) if device_name else None
    if spec is None:
        return {"card": device_name, "card_memory_bytes": None, "fits": None,
                "reason": f"{device_name or 'this CPU'}: no known memory size"}
    return {"card": spec.name, "card_memory_bytes": spec.memory_bytes,
            "fits": memory_bytes <= spec.memory_bytes, "reason": None}


def assemble(plan, timed: list[dict], latency_us, latency_source: str, env: dict,
             started: float) -> dict:
    """The emulated run's record: the run's schema, status ok, `emulation`, parity null."""
    from gptbench import figures, predict
    from gptbench.measure import run_layout

    cfg, grid = plan.cfg, plan.grid
    lay = run_layout(plan)
    pre, dec = stage_figures(plan, timed)
    pred = predict.predict(
        lay, pre, dec, predict.at_world(latency_us, grid.world_size),
        compute_source="emulated: per stage the slowest role's median over the timed "
                       "prefills / decode steps, under the fake process group",
        latency_source=latency_source)
    info = {k: v for r in timed for k, v in r["info"].items() if v is not None}
    by_key = {(r["stage"], t): r for r in timed for t in r["tp_ranks"]}
    per_rank = [by_key[(grid.coords(rank)[0], grid.coords(rank)[2])]["memory_bytes"]
                for rank in range(grid.world_size)]
    model = {**plan.model_dims, "params": timed[0].get("unsharded_params")}
    record = results.skeleton(cfg, grid.world_size, grid, model, env)
    record.update(status="ok", run_id=RUN_PREFIX + plan.run_id)
    record["topology"].update(micro_batches=plan.micro_batches,
                              heads_per_tp_rank=info.get("heads_per_tp_rank"),
                              stage_layers=info.get("stage_layers"),
                              pipe_topology=info.get("pipe_topology"),
                              # the row's own (a cached role may come from the other schedule)
                              pipeline_schedule=cfg.topology.pipeline_schedule
                              if grid.pp > 1 else None)
    record["workload"]["dtype"] = str(plan.dtype).replace("torch.", "")
    record["engine"].update(compile=plan.compile_mode, threads_per_rank=plan.threads)
    one = lambda v: None if v is None else {"mean": v, "p50": v, "p90": None, "p99": None}  # noqa: E731
    reasons = {"parity": "emulated: collectives move no data under the fake process group, "
                         "so the logits are wrong by design; no tokens are reported",
               "metrics.gpu_utilization_pct": "emulated run",
               "metrics.ttft_ms.p90": "emulated: one predicted value, no distribution"}
    for key in ("p90", "p99"):
        for m in ("tpot_ms", "e2e_ms", "ttft_ms"):
            reasons[f"metrics.{m}.{key}"] = "emulated: one predicted value, no distribution"
    tpot = pred["tpot_ms"]
    metrics = {
        "throughput_tokens_per_s": pred["tokens_per_s"], "ttft_ms": one(pred["ttft_ms"]),
        "tpot_ms": one(tpot), "e2e_ms": one(pred["e2e_ms"]),
        "peak_memory_bytes": {"per_rank": per_rank, "max": max(per_rank),
                              "kind": "emulated_shard"},
        "gpu_utilization_pct": None,
        "comm_fraction": pred["comm_ms_per_token"] / tpot if tpot else None,
        "predicted": pred, "model_memory_bytes": lay.memory(),
        "compile_s": max(r["compile"]["compile_s"] for r in timed)
        if plan.compile_mode != "off" else None,
        "graph_breaks": max(r["compile"]["graph_breaks"] for r in timed)
        if plan.compile_mode != "off" else None,
    }
    block, why = figures.roofline(plan, lay, metrics, env)
    metrics["roofline"] = block
    if why:
        reasons["metrics.roofline.fraction_of_peak"] = why
    record["metrics"], record["null_reasons"] = metrics, reasons
    device_name = env.get("device_name") if env.get("device") == "cuda" else None
    record["emulation"] = {
        "method": METHOD, "device": env.get("device_name") or plan.device.type,
        "roles": [{k: v for k, v in r.items() if k != "info"} for r in timed],
        "latency_source": latency_source, "not_modelled": NOT_MODELLED,
        "scope": scope(plan), "fits": fits(max(per_rank), device_name),
        "of_run_id": plan.run_id,
    }
    record["wall_s"] = time.time() - started
    return record


class RoleCache:
    """Role timings by signature, for one process's rows (a suite)."""

    def __init__(self):
        self.timed: dict[tuple, dict] = {}

    def get(self, plan, role: Role) -> dict:
        key = signature(plan, role)
        if key not in self.timed:
            self.timed[key] = time_role(plan, role)
            self.timed[key]["cached"] = False
            return self.timed[key]
        return {**self.timed[key], "stage": role.stage, "tp_ranks": list(role.tp_ranks),
                "rank": role.rank, "cached": True}


def emulate_plan(plan, cache: RoleCache, latency_us, latency_source: str) -> dict:
    from gptbench import envinfo

    started = time.time()
    env = envinfo.collect_env(plan.device)
    timed = [cache.get(plan, role) for role in roles(plan.grid, plan.model_dims["n_head"])]
    return assemble(plan, timed, latency_us, latency_source, env, started)


def _failed(cfg, world: int, run_id: str, status: str, error: str) -> dict:
    record = results.skeleton(cfg, world)
    record.update(run_id=RUN_PREFIX + run_id, status=status, error=error)
    if status == "not_applicable":
        record["null_reasons"]["metrics"] = "not applicable: " + error
    return record


def plan_for(cfg, ranks: int):
    """The run's plan with every rank on this one device (cuda:0 or the CPU), the threads a
    real rank would get (engine.threads, else the cores shared by `ranks`)."""
    import dataclasses

    from gptbench.runplan import resolve

    plan = resolve(cfg, ranks, 0, 1)
    threads = cfg.engine.threads or max(1, (os.cpu_count() or 1) // ranks)
    return dataclasses.replace(plan, threads=threads)


def check_rows(suite, path: str) -> None:
    """Every row's config resolved before anything starts (bad input: UserError)."""
    from gptbench.config import load_config
    from gptbench.runplan import check_output_dir

    for r in suite.runs:
        try:
            cfg = load_config(suite.base, list(r.overrides))
            check_output_dir(cfg.output_dir)
            plan_for(cfg, r.ranks)
        except NotApplicable:
            continue
        except UserError as e:
            raise UserError(f"{path}: run '{r.run_id}': {e}") from None


def emulate_row(config: str, sets: list[str], ranks: int, cache: RoleCache, latency_us,
                latency_source: str) -> dict:
    """One configuration's emulated record, written; a failure is recorded, not raised."""
    from gptbench.config import load_config
    from gptbench.runplan import check_output_dir, run_id_for
    from gptbench.worker import describe

    cfg = load_config(config, sets)
    check_output_dir(cfg.output_dir)
    run_id = run_id_for(cfg, ranks)
    try:
        plan = plan_for(cfg, ranks)
        record = emulate_plan(plan, cache, latency_us, latency_source)
    except NotApplicable as e:
        record = _failed(cfg, ranks, run_id, "not_applicable", str(e))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - one failed row is recorded, the suite goes on
        status = "oom" if isinstance(e, torch.OutOfMemoryError) else "failed"
        record = _failed(cfg, ranks, run_id, status, describe(e))
    results.write_json_atomic(results.run_path(cfg.output_dir, record["run_id"]), record)
    return record


def line(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['run_id']}: {record['status']}: {record.get('error')}"
    p = record["metrics"]["predicted"]
    scope_ = record["emulation"]["scope"]
    note = "" if scope_["in_scope"] else f" (out of scope: {scope_['reason']})"
    ttft = p["ttft_ms"]
    return (f"{record['run_id']}: emulated TPOT {p['tpot_ms']:.2f} ms, TTFT "
            f"{ttft:.1f} ms, {p['tokens_per_s']:.1f} tokens/s{note}")


def run_suite_rows(path: str, output_dir: str | None, only, overrides, latency_us,
                   latency_source: str) -> int:
    """Every row of a suite emulated in this process, one shared role cache."""
    from gptbench.suite import load_suite

    suite = load_suite(path, output_dir, only, overrides)
    cache = RoleCache()
    for r in suite.runs:
        record = emulate_row(suite.base, list(r.overrides), r.ranks, cache, latency_us,
                             latency_source)
        print(line(record), flush=True)
    return 0


def add_latency_arguments(p: argparse.ArgumentParser) -> None:
    # Not an argparse exclusive group: giving both is one line of bad input (predict.latency_from)
    p.add_argument("--comm-file", help="collective latencies from gptbench diagnose --comm")
    p.add_argument("--interconnect", help="a named link: nvlink4, nvlink3, nvlink-bridge, "
                   "pcie5, pcie4 (docs/interconnects.md)")


def emulate_command(config: str, sets: list[str], ranks: int | None, comm_file: str | None,
                    interconnect: str | None) -> int:
    """`gptbench emulate`: one configuration, in this process."""
    from gptbench import predict
    from gptbench.config import load_config

    latency_us, source = predict.latency_from(comm_file, interconnect)
    cfg = load_config(config, sets)
    ranks = ranks or cfg.topology.world_size or 1
    try:
        record = emulate_row(config, sets, ranks, RoleCache(), latency_us, source)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(f"{line(record)} -> {results.run_path(cfg.output_dir, record['run_id'])}")
    return 0 if record["status"] in ("ok", "not_applicable") else 1


def main(argv=None) -> int:
    """The child process of `gptbench suite FILE --emulate`."""
    p = argparse.ArgumentParser(prog="python -m gptbench.emulate")
    p.add_argument("--suite", required=True)
    p.add_argument("--output-dir")
    p.add_argument("--only", action="append")
    p.add_argument("--set", action="append", default=[])
    add_latency_arguments(p)
    a = p.parse_args(argv)
    from gptbench import predict

    try:
        latency_us, source = predict.latency_from(a.comm_file, a.interconnect)
        return run_suite_rows(a.suite, a.output_dir, a.only, a.set, latency_us, source)
    except UserError as e:
        print(f"gptbench: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
