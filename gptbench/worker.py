"""One rank of a run: config -> grid -> model + strategy -> timed generation -> record.

Started by the `deepspeed` launcher (or torchrun) through launch/run.py. Rank 0 gathers
the per-rank measurements and writes the run record; a rank that fails writes its error
for the orchestrator (gptbench run / suite) and leaves at once, so the launcher stops the
others instead of letting them wait in a collective.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import sys
import time
import traceback

import torch

from gptbench import faults, multinode, parity, progress, results
from gptbench.compiled import (
    CapturedCode,
    CompileStats,
    InductorOptions,
    compiling,
    decode_graph,
    measuring,
)
from gptbench.config import RunConfig, load_config
from gptbench.errors import NotApplicable, UserError
from gptbench.progress import ROW_MARKER
from gptbench.results import error_path
from gptbench.runplan import RunPlan, check_output_dir, resolve, run_id_for
from gptbench.strategies import REGISTRY
from gptbench.strategies.base import RankContext


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=False)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sweep", metavar="FILE", help="YAML 'runs:' list of override mappings "
                   "to run one after the other in these processes (same number of ranks)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dist_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_size) from the launcher; one rank without one."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    return rank, world, local, local_size


def init_distributed(plan: RunPlan, rank: int, world: int, local_size: int) -> None:
    import deepspeed

    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_SIZE", str(local_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed's CPU shm all-reduce ignores process groups: with tensor-parallel groups
    # smaller than the world its results are silently wrong (docs/deepspeed-notes.md,
    # CPU all-reduce). Keep it off.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from gptbench.watchdog import for_plan

    timeout = _dt.timedelta(seconds=for_plan(plan)[0])
    # Groups made later (tensor-parallel groups, DeepSpeed's pipeline groups) take torch's
    # default timeout (30 min), not the world's: a silent peer would hang them that long.
    graphed_collectives = plan.compile_mode == "reduce-overhead" and plan.grid.tp > 1
    if plan.device.type == "cuda" and plan.cfg.engine.profile_comm and not graphed_collectives:
        # NCCL records start/end events per collective only when told before its groups
        # exist: the profiled batch reads each collective's kernel time from them
        # (trackers/comm.py), instead of syncing around every call. Not where all-reduces
        # are captured in CUDA graphs (compiled tensor parallel): whether NCCL's timing
        # events are legal inside a capture is unverified, so such a row's breakdown is
        # null with the reason rather than a capture put at risk.
        os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(
        dist_backend="nccl" if plan.device.type == "cuda" else "gloo", timeout=timeout)


_free_port = multinode.free_port  # where the other modules have always taken it from


def _shm_allreduce_active() -> bool:
    from deepspeed.comm import comm

    return getattr(comm.cdb, "shm_comm_op", None) is not None


def make_groups(grid, rank: int):
    """Every rank creates every tensor-parallel group (new_group is collective)."""
    mine, ranks = None, []
    for members in grid.tp_groups():
        group = torch.distributed.new_group(members)
        if rank in members:
            mine, ranks = group, members
    return mine, ranks


def run_rank(plan: RunPlan, rank: int, inject) -> tuple[dict, dict]:
    """This rank's measurements and the strategy's info (head split, stages...)."""
    from gptbench import measure

    cfg, grid = plan.cfg, plan.grid
    progress.start(plan.run_id, rank == grid.output_ranks()[0])
    progress.phase("loading the model and the parity reference")
    inject("load")
    model = plan.load_model()
    params = sum(p.numel() for p in model.parameters())  # unsharded; tied weights once
    tp_group, tp_ranks = make_groups(grid, rank) if grid.tp > 1 else (None, [rank])
    batches = plan.batches(rank)
    is_output = rank in grid.output_ranks()
    probe = batches[0][:cfg.parity.samples]
    ref = parity.reference(model, probe, cfg.parity.tokens) if cfg.parity.enabled else None
    options = inductor_options(plan)
    ctx = RankContext(cfg=cfg, grid=grid, rank=rank, device=plan.device, dtype=plan.dtype,
                      model=model, tp_group=tp_group, tp_ranks=tp_ranks,
                      info={"micro_batches": plan.micro_batches, "params": params,
                            "compile_mode": plan.compile_mode, "inductor": options})
    progress.phase("sharding")
    gen = REGISTRY[cfg.strategy](ctx)
    del model, ctx.model
    gc.collect()  # the unsharded copy: this rank keeps only its shard
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    max_len = cfg.workload.input_len + cfg.workload.output_len
    with compiled_code(options) as code:
        compiled = compile_warmup(gen, plan, batches, probe)
    with compiling(options), measuring(options):
        mine = measure.measure_rank(gen, batches, probe, ref, plan, rank, inject, ctx.info)
    mine["compile"] = {**compiled, "graphs_while_measuring":
                       CompileStats.since(compiled.pop("_after")).graphs,
                       "decode_graph": decode_graph(code.codes, max_len)
                       if code is not None else None}
    mine["is_output"] = is_output
    mine["params"] = sum(p.numel() for p in gen.module.parameters())
    mine["shm_allreduce"] = _shm_allreduce_active()
    mine.update(multinode.rank_facts())  # host and socket addresses, once every group exists
    return mine, ctx.info


def inductor_options(plan: RunPlan):
    """How gptbench's step is compiled in this run; None where it is not (eager rows, and
    the Hugging Face baselines, which compile their own way)."""
    if plan.compile_mode == "off" or plan.cfg.engine.backend != "deepspeed":
        return None
    return InductorOptions.of(plan.cfg.engine, plan.compile_mode)


@contextlib.contextmanager
def compiled_code(options):
    """Inductor's generated code of the graphs compiled inside, under `options`."""
    if options is None:
        yield None
        return
    with compiling(options), CapturedCode() as code:
        yield code


def compile_warmup(gen, plan: RunPlan, batches, probe) -> dict:
    """Compile every shape the measured region will see, untimed: the workload's batch and
    the parity probe, prefill and decode, each called often enough for CUDA graphs to be
    recorded and replayed (compiled.WARMUP_CALLS). Returns torch's compile counters."""
    from torch._dynamo.utils import counters

    from gptbench import runner
    from gptbench.compiled import WARMUP_CALLS, snapshot

    start = snapshot()
    skips = counters["inductor"]["cudagraph_skips"]  # graphs inductor left uncaptured
    wall = time.perf_counter()
    if plan.compile_mode != "off":
        progress.phase("compiling")
        steps = min(plan.cfg.workload.output_len, WARMUP_CALLS)
        with torch.no_grad():
            for ids in {tuple(b.shape): b for b in (batches[0], probe)}.values():
                if hasattr(gen, "precompile"):  # pipeline stages: each on its own first
                    gen.precompile(ids)
                for _ in range(WARMUP_CALLS):
                    runner.generate_batch(gen, ids, steps)
    stats = CompileStats.since(start)
    return {"mode": plan.compile_mode, "compile_s": stats.compile_s,
            "warmup_wall_s": time.perf_counter() - wall, "graph_breaks": stats.graph_breaks,
            "graphs": stats.graphs, "_after": snapshot(),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips}


def write_record(plan: RunPlan, ranks: list[dict], info: dict, started: float,
                 launch: dict | None = None) -> dict:
    from gptbench import envinfo, figures

    model = {**plan.model_dims, "params": info["params"]}
    record = results.skeleton(plan.cfg, plan.grid.world_size, plan.grid, model,
                              envinfo.collect_env(plan.device))
    record["status"] = "ok"
    record["run_id"] = plan.run_id  # derived when the config names none (a direct launch)
    record["topology"].update(micro_batches=plan.micro_batches,
                              heads_per_tp_rank=info.get("heads_per_tp_rank"),
                              stage_layers=info.get("stage_layers"),
                              params_per_rank=[r["params"] for r in ranks],
                              pipe_topology=info.get("pipe_topology"),
                              **multinode.placement(ranks))
    record["workload"]["dtype"] = str(plan.dtype).replace("torch.", "")
    record["engine"]["threads_per_rank"] = torch.get_num_threads()
    record["engine"]["shm_allreduce"] = any(r["shm_allreduce"] for r in ranks)
    record["engine"]["deepspeed_config"] = info.get("deepspeed_config")
    record["engine"]["compile"] = plan.compile_mode
    from gptbench.watchdog import for_plan

    record["engine"]["comm_timeout_s"], record["engine"]["comm_timeout_reason"] = for_plan(plan)
    options = inductor_options(plan)
    record["engine"]["inductor"] = options.as_record() if options is not None else None
    # whose decode step ran: gptbench's (gptbench/step.py) or Hugging Face's forward
    record["engine"]["step"] = "gptbench" if options is not None else "hf"
    record["topology"]["pipeline_schedule"] = info.get("pipeline_schedule")
    metrics, reasons = results.aggregate_metrics(ranks, plan.grid, plan.micro_batches)
    figures.model_metrics(plan, ranks, metrics, record["env"], reasons)
    figures.quality_metrics(plan, ranks, metrics, reasons)
    metrics.update(compile_metrics(ranks, plan.compile_mode, reasons))
    metrics["decode_profile"] = decode_profile_of(ranks, reasons)
    record["metrics"], record["null_reasons"] = metrics, reasons
    record["parity"] = results.aggregate_parity(ranks)
    if record["parity"] is None:
        reasons["parity"] = "parity check disabled (parity.enabled: false)"
    record["wall_s"] = time.time() - started
    if launch is not None:
        peaks = [r.get("peak_rss_bytes") for r in ranks]
        if any(peaks):
            record["rank_peak_rss_bytes"] = {"per_rank": peaks, "max": max(p or 0 for p in peaks),
                                             "source": launch["peak_rss"]}
        record["engine"]["launch"] = {"rows": launch["rows"], "position": launch["position"]}
    results.write_json_atomic(results.run_path(plan.cfg.output_dir, plan.run_id), record)
    return record


def compile_metrics(ranks: list[dict], mode: str, reasons: dict) -> dict:
    """compile_s: the slowest rank's seconds in dynamo/inductor (ranks compile in parallel);
    graph_breaks / graphs: the most any rank saw; graphs_while_measuring > 0 means a shape
    was compiled inside the measured region (parity, timed or profiled batches)."""
    if mode == "off":
        for key in ("compile_s", "graph_breaks"):
            reasons[f"metrics.{key}"] = "engine.compile is off for this run"
        return {"compile_s": None, "graph_breaks": None, "compile": None}
    c = [r["compile"] for r in ranks]
    return {"compile_s": max(x["compile_s"] for x in c),
            "graph_breaks": max(x["graph_breaks"] for x in c),
            "compile": {"warmup_wall_s": max(x["warmup_wall_s"] for x in c),
                        "graphs": max(x["graphs"] for x in c),
                        "graphs_while_measuring": max(x["graphs_while_measuring"] for x in c),
                        # reduce-overhead graphs inductor ran without CUDA graphs (it logs why)
                        "cudagraph_skips": max(x.get("cudagraph_skips", 0) for x in c),
                        # the decode graph of each rank role (ranks of one role compile the
                        # same graph): the most inputs, copies and launches any rank has
                        "decode_graph": _worst_graph([x.get("decode_graph") for x in c])}}


def decode_profile_of(ranks: list[dict], reasons: dict) -> dict | None:
    """The decode profile of the slowest profiled rank (the one with the longest step)."""
    profiles = [r["decode_profile"] for r in ranks if r.get("decode_profile")]
    if not profiles:
        reasons["metrics.decode_profile"] = next(
            (r["decode_profile_reason"] for r in ranks if r.get("decode_profile_reason")),
            "no rank profiled its decode steps")
        return None
    return max(profiles, key=lambda p: p["step_ms"])


def _worst_graph(graphs: list) -> dict | None:
    graphs = [g for g in graphs if g]
    if not graphs:
        return None
    return {k: max(g[k] for g in graphs if g[k] is not None) if any(g[k] is not None
            for g in graphs) else None for k in graphs[0]}


def describe(exc: BaseException) -> str:
    """One line naming the exception. An empty message (StopIteration, a bare assert) says
    nothing on its own: then the line says where it was raised (innermost frame)."""
    text = " ".join(str(exc).split())
    if text:
        return f"{type(exc).__name__}: {text}"[:500]
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return f"{type(exc).__name__} (no message)"
    where = frames[-1]
    return (f"{type(exc).__name__} (no message) raised at {_short_path(where.filename)}:"
            f"{where.lineno} in {where.name}")


def _short_path(path: str) -> str:
    """deepspeed/runtime/pipe/engine.py rather than the whole site-packages path."""
    marker = "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def _write_error(cfg: RunConfig, run_id: str, rank: int, detail: dict) -> None:
    """This rank's error file: the launcher names the failing rank from these files."""
    results.write_json_atomic(error_path(cfg.output_dir, run_id, rank), {"rank": rank, **detail})


def fail(cfg: RunConfig, run_id: str, world: int, rank: int, exc: BaseException) -> None:
    """Record this rank's failure (its own file, and the run record if none exists yet)."""
    status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "failed"
    line = describe(exc)
    detail = {"status": status, "error": line, "traceback": traceback.format_exc(limit=20)}
    if status == "oom" and torch.cuda.is_available():
        detail["cuda_memory"] = {"allocated_bytes": torch.cuda.memory_allocated(),
                                 "reserved_bytes": torch.cuda.memory_reserved()}
    _write_error(cfg, run_id, rank, detail)
    path = results.run_path(cfg.output_dir, run_id)
    if not os.path.exists(path):
        results.write_json_atomic(path, results.unfinished(cfg, world, run_id, status,
                                                           f"rank {rank}: {line}", rank))


def _variants(args) -> list[list[str]]:
    """The override lists to run: one, or one per entry of a --sweep file. An entry is a
    mapping of overrides, or a list of KEY=VALUE pairs (as a suite hands its rows over)."""
    if not args.sweep:
        return [args.set]
    from gptbench.config import override_pairs, read_yaml

    runs = read_yaml(args.sweep).get("runs")
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{args.sweep}: expected 'runs:', a non-empty list of override mappings")
    out = []
    for i, v in enumerate(runs):
        if isinstance(v, list) and all(isinstance(p, str) and "=" in p for p in v):
            out.append(args.set + v)
        else:
            out.append(args.set + override_pairs(v, f"{args.sweep}: runs[{i}]"))
    return out


def _plans(args, rank: int, world: int, local_rank: int, local_size: int) -> list[RunPlan]:
    """Resolved plans; a not-applicable variant is recorded (by rank 0) and left out."""
    plans = []
    for sets in _variants(args):
        cfg = load_config(args.config, sets)
        check_output_dir(cfg.output_dir)
        try:
            plans.append(resolve(cfg, world, local_rank, local_size))
        except NotApplicable as e:
            if rank == 0:
                run_id = run_id_for(cfg, world)
                results.write_json_atomic(results.run_path(cfg.output_dir, run_id),
                                          results.not_applicable(cfg, world, run_id, str(e)))
                print(f"gptbench: {run_id}: not applicable: {e}", flush=True)
        except UserError as e:
            # What this rank found (e.g. too few GPUs on its node) may be seen by no other
            # rank: every rank leaves its error file, not only rank 0 its message.
            _write_error(cfg, run_id_for(cfg, world), rank,
                         {"status": "failed", "error": str(e), "traceback": None})
            raise
    return plans


def between_rows(device) -> None:
    """Leave nothing of one row to the next: every rank done with the last row, dynamo's
    compiled graphs dropped (the next row compiles and warms up on its own), freed memory
    handed back."""
    torch.distributed.barrier()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_rss() -> str:
    """Start this row's peak memory afresh; returns how the row's peak is taken.

    VmHWM (the process's resident high-water mark) is reset to the current RSS by writing
    5 to /proc/self/clear_refs (proc(5), Linux >= 4.0); CUDA's allocator peak by
    reset_peak_memory_stats."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return "VmHWM of each rank at the row's end, reset at its start (clear_refs 5)"
    except OSError as e:
        return (f"VmHWM of each rank at the row's end, since the process started (the reset "
                f"was refused: {e.strerror}), so it includes earlier rows of its launch")


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def teardown() -> None:
    """Leave no process group behind: C++ threads of a group still alive at interpreter
    exit can abort a rank that finished its work ("terminate called without an active
    exception", exit code -6), failing a run that succeeded."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before anything starts CUDA: a direct `deepspeed` launch has not had gptbench's
    # launcher set it (launcher.RANK_ENV_DEFAULTS says why)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    multinode.die_with_launcher()
    rank, world, local_rank, local_size = dist_env()
    try:
        faults.parse(os.environ.get(faults.ENV))  # a bad spec is bad input, not a failed run
        plans = _plans(args, rank, world, local_rank, local_size)
    except UserError as e:
        if local_rank == 0:  # once per machine: another node may see what rank 0 does not
            who = "" if rank == 0 else f"rank {rank}: "
            print(f"gptbench: {who}error: {e}", file=sys.stderr, flush=True)
        return 2
    if not plans:
        return 0
    plan = plans[0]
    try:
        torch.set_num_threads(plan.threads)
        if plan.device.type == "cuda":
            torch.cuda.set_device(plan.device)  # NCCL binds each rank to its own GPU
        init_distributed(plan, rank, world, local_size)
        for i, plan in enumerate(plans):  # a --sweep: its variants one after the other
            if i:
                between_rows(plan.device)
            started = time.time()
            if rank == 0:  # the orchestrator splits the log and times each row from here
                print(f"{ROW_MARKER}{plan.run_id} ({i + 1}/{len(plans)})", flush=True)
            peak = reset_peak_rss()
            inject = faults.from_env(rank, plan.device, plan.run_id)
            torch.set_num_threads(plan.threads)
            mine, info = run_rank(plan, rank, inject)
            mine["peak_rss_bytes"] = _vm_hwm_bytes()
            gathered = [None] * world if rank == 0 else None
            torch.distributed.gather_object(mine, gathered, dst=0)
            if rank == 0:
                launch = {"rows": len(plans), "position": i + 1, "peak_rss": peak}
                record = write_record(plan, gathered, info, started, launch)
                passed = (record["parity"] or {}).get("passed")
                print(f"gptbench: {plan.run_id}: "
                      f"{record['metrics']['throughput_tokens_per_s']:.1f} tokens/s, parity "
                      f"{'ok' if passed else 'see record'} -> "
                      f"{results.run_path(plan.cfg.output_dir, plan.run_id)}", flush=True)
        torch.distributed.barrier()
        teardown()
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then we leave
        fail(plan.cfg, plan.run_id, world, rank, exc)
        print(f"gptbench: rank {rank} failed: {describe(exc)}", file=sys.stderr, flush=True)
        os._exit(3 if isinstance(exc, torch.OutOfMemoryError) else 1)
