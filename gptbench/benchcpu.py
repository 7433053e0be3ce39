"""`make bench-cpu`: what gptbench's harness costs, and what 2 ranks buy, on this CPU.

A benchmark, not a test: it prints a table and writes `<output_dir>/bench.json`, and exits 0
whether or not a target is met (1 only when nothing could be measured).

1. Overhead, in one process: the worker's timed loop (`runner.run_timed` over the
   `pure_data_parallel` strategy's generator, i.e. `CachedLM` of the plain Hugging Face
   model) against a bare `model.generate` loop (greedy, min_new_tokens = max_new_tokens,
   so both make exactly output_len tokens) on the same model, batches and thread count.
   Each unit is one batch; the arms run back to back on the same batch, in rotating
   order, `repeats` times over the batches, and `overhead_ratio` = median over these pairs
   of gptbench tokens/s / bare tokens/s, so a shared machine's drift hits both sides of
   each ratio. Target: >= 0.97. `overhead_ratio_cpu_time` is the same with this process's
   CPU seconds (immune to other processes taking the cores; exact with one thread, the
   config's engine.threads). The DeepSpeed
   `InferenceEngine` arm (`init_inference`, tp_size=1, gloo, world of one) runs the same
   way when DeepSpeed initialises in-process, else it is skipped with the reason.
   `compile_speedup`: the same pairing between gptbench's compiled step over the DeepSpeed
   engine's module (engine.compile=default: inductor, parameters frozen, the KV cache
   written in place; no CUDA graphs on CPU) and the same engine eager, on separate copies
   of the model; target >= 1.5 on the small preset. Compilation
   happens in the untimed warm-up (`compile_s`).
2. Scaling: deepspeed_configs/bench-cpu.yaml through the `deepspeed` launcher, one torch
   thread per rank: 1 rank of pure_data_parallel (the baseline), then 2 ranks of each
   strategy. speedup = tokens/s over the baseline's; parallel_efficiency = speedup / ranks.
   pure_data_parallel gives every replica its own samples (weak scaling), tensor and
   pipeline split one replica's work (same tokens as the baseline).
3. Pipeline schedules, side by side: one 2-rank launch runs pipeline_data_hybrid with the
   flush and in_flight schedules alternately (`--sweep`, SCHEDULE_PAIRS pairs, same
   processes); `pipeline_in_flight_speedup` = median over pairs of in_flight tokens/s /
   flush tokens/s (target >= 1.3). On this machine a gloo send/recv round trip costs
   ~0.4 ms: overlapping it with other micro-batches' compute is most of what there is to win.
"""
from __future__ import annotations

import datetime as _dt
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from gptbench import compiled, scaling
from gptbench.benchfmt import fmt, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "deepspeed_configs", "bench-cpu.yaml")
SCHEMA = "gptbench.bench-cpu/1"
OVERHEAD_TARGET = 0.97
COMPILE_TARGET = 1.5
IN_FLIGHT_TARGET = 1.3
SCHEDULE_PAIRS = 2
REPEATS = 7
ARMS = ("bare_hf_generate", "gptbench_hf", "gptbench_deepspeed", "gptbench_compiled")
# (row name, ranks, overrides); the baseline runs first so the 2-rank records find it.
SCALING_RUNS = (
    ("baseline", 1, ["strategy=pure_data_parallel"]),
    ("pure_data_parallel", 2, ["strategy=pure_data_parallel"]),
    ("tensor_data_hybrid", 2, ["strategy=tensor_data_hybrid", "topology.tp=2"]),
    ("pipeline_data_hybrid", 2, ["strategy=pipeline_data_hybrid", "topology.pp=2"]),
)


# ---- overhead: one process, three arms ---------------------------------------------------

def bare_unit(model, ids: torch.Tensor, output_len: int) -> tuple[int, float, float]:
    """(tokens, wall s, CPU s) of plain Hugging Face generation of exactly `output_len`
    greedy tokens per sequence."""
    cpu, start = time.process_time(), time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len)
    wall = time.perf_counter() - start
    return out[:, ids.shape[1]:].numel(), wall, time.process_time() - cpu  # (B, output_len)


def gptbench_unit(gen, ids: torch.Tensor, output_len: int) -> tuple[int, float, float]:
    """(tokens, wall s, CPU s) of one timed iteration of the worker's loop over one batch
    (no other ranks: the barrier is a no-op); the wall time is the worker's own."""
    from gptbench import runner

    cpu = time.process_time()
    timing = runner.run_timed(gen, [ids], output_len, iterations=1, warmup=0,
                              barrier=lambda: None)
    return timing.generated_tokens, timing.timed_wall_s, time.process_time() - cpu


def same_tokens(model, gen, ids: torch.Tensor, output_len: int) -> bool:
    """Both loops must produce the same tokens, or the comparison is not like for like."""
    from gptbench import runner

    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len)
    tokens, _, _ = runner.generate_batch(gen, ids, output_len)
    return bool(torch.equal(ref[:, ids.shape[1]:], tokens))


@contextmanager
def _single_rank_env():
    """RANK/WORLD_SIZE/MASTER_* for a world of one, restored afterwards so that the
    launcher runs that follow do not inherit them."""
    from gptbench.worker import _free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_generator(plan, model):
    """The pure_data_parallel strategy's DeepSpeed engine, built in this process."""
    import deepspeed

    from gptbench.strategies import REGISTRY
    from gptbench.strategies.base import RankContext

    with _single_rank_env():
        # DeepSpeed's CPU shm all-reduce ignores process groups (docs/deepspeed-notes.md,
        # CPU all-reduce): keep it off.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    from gptbench.worker import inductor_options

    ctx = RankContext(cfg=plan.cfg, grid=plan.grid, rank=0, device=plan.device,
                      dtype=plan.dtype, model=model,
                      info={"compile_mode": plan.compile_mode, "inductor": inductor_options(plan)})
    return REGISTRY["pure_data_parallel"](ctx)


def _plan(config_path: str, overrides: list[str], backend: str, compile_mode: str = "off"):
    from gptbench.config import load_config
    from gptbench.runplan import resolve

    cfg = load_config(config_path, list(overrides) + ["strategy=pure_data_parallel",
                                                      f"engine.backend={backend}",
                                                      f"engine.compile={compile_mode}"])
    return resolve(cfg, 1)


def measure_overhead(config_path: str = CONFIG, overrides: list[str] = (),
                     repeats: int = REPEATS, with_deepspeed: bool = True) -> dict:
    """The `overhead` block of bench.json; see the module docstring for the method."""
    import copy

    from gptbench.strategies import REGISTRY
    from gptbench.strategies.base import RankContext

    plan = _plan(config_path, overrides, "hf_eager")
    w = plan.cfg.workload
    torch.set_num_threads(plan.threads)
    model = plan.load_model()
    batches = plan.batches(0)
    ctx = RankContext(cfg=plan.cfg, grid=plan.grid, rank=0, device=plan.device,
                      dtype=plan.dtype, model=model, info={"compile_mode": "off"})
    gens = {"gptbench_hf": REGISTRY["pure_data_parallel"](ctx)}
    skipped, compile_s, options = {}, None, None
    for name, mode in (("gptbench_deepspeed", "off"), ("gptbench_compiled", "default")):
        if not with_deepspeed:
            skipped[name] = "not requested (with_deepspeed=False)"
            continue
        try:
            ds_plan = _plan(config_path, overrides, "deepspeed", mode)
            if mode != "off":
                from gptbench.worker import inductor_options

                options = inductor_options(ds_plan)
            gens[name] = deepspeed_generator(ds_plan, copy.deepcopy(model))
        except Exception as e:  # noqa: BLE001 - reported in bench.json, the rest still runs
            skipped[name] = " ".join(f"{type(e).__name__}: {e}".split())[:300]

    units = {"bare_hf_generate": lambda ids: bare_unit(model, ids, w.output_len)}
    for name, gen in gens.items():
        units[name] = lambda ids, gen=gen: gptbench_unit(gen, ids, w.output_len)
    names = list(units)
    wall = {name: [] for name in names}  # tokens per wall second, one per (repeat, batch)
    cpu = {name: [] for name in names}   # tokens per CPU second of this process
    with torch.no_grad(), compiled.compiling(options):
        start = compiled.snapshot()
        tokens_match = {name: same_tokens(model, gen, batches[0], w.output_len)
                        for name, gen in gens.items()}
        for name in names:  # warm-up: allocator, thread pool, first-call paths, compilation
            units[name](batches[0])
        compile_s = compiled.CompileStats.since(start).compile_s
        stance = compiled.measuring(options)  # as the worker measures a compiled run
        stance.__enter__()
        # One batch per unit, arms back to back, order rotating: a pair of units sees
        # the same machine state even when other processes come and go.
        for i in range(repeats * len(batches)):
            ids = batches[i % len(batches)]
            for name in names[i % len(names):] + names[:i % len(names)]:
                tokens, wall_s, cpu_s = units[name](ids)
                wall[name].append(tokens / wall_s)
                cpu[name].append(tokens / cpu_s if cpu_s > 0 else None)
        stance.__exit__(None, None, None)
    if "gptbench_deepspeed" in gens and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the world of one is done
    block = overhead_block({"wall": wall, "cpu": cpu}, tokens_match, skipped, plan, model)
    block["compile_s"] = compile_s if "gptbench_compiled" in gens else None
    return block


def overhead_block(samples: dict, tokens_match: dict[str, bool], skipped: dict[str, str],
                   plan, model) -> dict:
    """`samples`: {"wall": {arm: [tokens/s]}, "cpu": {arm: [tokens/CPU-s]}}, paired by index."""
    w = plan.cfg.workload
    wall, cpu = samples["wall"], samples["cpu"]
    arms = {}
    for name in ARMS:
        if name not in wall:
            arms[name] = {"tokens_per_s": None, "skipped": skipped.get(name)}
            continue
        arms[name] = {"tokens_per_s_median": statistics.median(wall[name]),
                      "tokens_per_s": wall[name],
                      "tokens_per_cpu_s": cpu[name],
                      "tokens_match_bare": tokens_match.get(name)}
        if name != "bare_hf_generate":
            arms[name]["ratio_to_bare"] = paired_ratio(wall[name], wall["bare_hf_generate"])
            arms[name]["cpu_time_ratio_to_bare"] = paired_ratio(cpu[name],
                                                                cpu["bare_hf_generate"])
    if "gptbench_compiled" in wall and "gptbench_deepspeed" in wall:
        arms["gptbench_compiled"]["ratio_to_eager"] = paired_ratio(
            wall["gptbench_compiled"], wall["gptbench_deepspeed"])
    return {
        "method": "one batch per unit, arms back to back in rotating order; ratio = median "
                  "over pairs of arm tokens/s / bare tokens/s (wall clock); the CPU-time "
                  "ratio uses this process's CPU seconds instead (robust to other processes "
                  "taking the cores, exact only with 1 thread)",
        "model": {**plan.model_dims, "params": sum(p.numel() for p in model.parameters())},
        "workload": {"dtype": str(plan.dtype).replace("torch.", ""),
                     "batch_size": w.batch_size, "input_len": w.input_len,
                     "output_len": w.output_len, "batches": w.num_samples // w.batch_size},
        "threads": torch.get_num_threads(),
        "pairs": len(wall["bare_hf_generate"]),
        "arms": arms,
    }


def paired_ratio(candidate: list, bare: list) -> float | None:
    """Median of per-pair ratios (each pair measured back to back); pairs with a missing
    side are left out."""
    ratios = [c / b for c, b in zip(candidate, bare) if c is not None and b]
    return statistics.median(ratios) if ratios else None


# ---- scaling: launcher runs ----------------------------------------------------------------

def scaling_row(record: dict, ranks: int, baseline: dict | None) -> dict:
    """One strategy's row from its run record and the 1-rank baseline's record."""
    m = record.get("metrics") or {}
    ok = record.get("status") == "ok" and bool(m)
    base_ok = bool(baseline) and baseline.get("status") == "ok" and bool(baseline.get("metrics"))
    throughput = m.get("throughput_tokens_per_s") if ok else None
    derived = (scaling.relative_to(record, baseline) if throughput is not None and base_ok
               else {"speedup": None, "parallel_efficiency": None})
    bubble = m.get("bubble_fraction") or {}
    parity = record.get("parity") or {}
    topo = record.get("topology") or {}
    return {
        "run_id": record.get("run_id"),
        "status": record.get("status"),
        "error": record.get("error"),
        "ranks": ranks,
        "dp": topo.get("dp"), "tp": topo.get("tp"), "pp": topo.get("pp"),
        "threads_per_rank": (record.get("engine") or {}).get("threads_per_rank"),
        "throughput_tokens_per_s": throughput,
        "speedup": derived["speedup"],
        "parallel_efficiency": derived["parallel_efficiency"],
        "comm_fraction": m.get("comm_fraction"),
        "bubble_fraction_measured": bubble.get("measured"),
        "bubble_fraction_theory": bubble.get("theory"),
        "tpot_ms_p50": (m.get("tpot_ms") or {}).get("p50"),
        "ttft_ms_p50": (m.get("ttft_ms") or {}).get("p50"),
        "throughput_cv_pct": m.get("throughput_cv_pct"),
        "parity_passed": parity.get("passed"),
        "max_abs_logit_diff": parity.get("max_abs_logit_diff"),
        "wall_s": record.get("wall_s"),
    }


def measure_scaling(output_dir: str, config_path: str = CONFIG,
                    overrides: list[str] = ()) -> tuple[dict | None, dict]:
    """(baseline row, {strategy: row}); records land in output_dir/runs, logs in /logs."""
    from gptbench import launcher

    rows, baseline, baseline_row = {}, None, None
    for name, ranks, extra in SCALING_RUNS:
        sets = list(overrides) + extra + [f"output_dir={output_dir}", "engine.threads=1"]
        log = os.path.join(output_dir, "logs", f"{name}-{ranks}r.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        print(f"bench-cpu: {name} on {ranks} rank(s) ...", flush=True)
        load = _load_avg()
        record = launcher.run(config_path, sets, ranks=ranks, log_path=log)
        if name == "baseline":
            baseline = record
        row = scaling_row(record, ranks, baseline)
        row["load_avg_1m_at_start"] = load
        if name == "baseline":
            baseline_row = row
        else:
            rows[name] = row
        failed = "" if row["status"] == "ok" else f" - {row['error']}"
        print(f"  {row['status']}: {fmt(row['throughput_tokens_per_s'], '.1f')} tokens/s"
              f"{failed} (log {log})", flush=True)
    return baseline_row, rows


def measure_schedules(output_dir: str, config_path: str = CONFIG, overrides: list[str] = (),
                      pairs: int = SCHEDULE_PAIRS) -> dict:
    """Both pipeline schedules on 2 ranks, alternating in one launch (the same processes and
    machine state for both); `speedup` = median of in_flight / flush over the pairs."""
    import subprocess

    import yaml

    from gptbench import launcher

    runs = [{"run_id": f"schedule-{kind}-{i}", "topology": {"pipeline_schedule": kind}}
            for i in range(pairs) for kind in ("flush", "in_flight")]
    sweep = os.path.join(output_dir, "schedules.yaml")
    os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
    with open(sweep, "w", encoding="utf-8") as f:
        yaml.safe_dump({"runs": runs}, f)
    sets = list(overrides) + ["strategy=pipeline_data_hybrid", "topology.pp=2",
                              f"output_dir={output_dir}", "engine.threads=1"]
    log = os.path.join(output_dir, "logs", "schedules-2r.log")
    print(f"bench-cpu: pipeline schedules, {pairs} pairs on 2 ranks ...", flush=True)
    with open(log, "w", encoding="utf-8") as out:
        subprocess.run(launcher.deepspeed_command(config_path, sets, 2) + ["--sweep", sweep],
                       stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False,
                       start_new_session=True)
    rows = {}
    for run in runs:
        from gptbench import results

        record = results.read_record(results.run_path(output_dir, run["run_id"])) or {}
        rows[run["run_id"]] = scaling_row(record, 2, None) if record else {
            "run_id": run["run_id"], "status": "missing", "throughput_tokens_per_s": None}
    ratios = []
    for i in range(pairs):
        flush = rows[f"schedule-flush-{i}"]["throughput_tokens_per_s"]
        in_flight = rows[f"schedule-in_flight-{i}"]["throughput_tokens_per_s"]
        if flush and in_flight:
            ratios.append(in_flight / flush)
    return {"method": "pipeline_data_hybrid pp=2 m=2, 1 thread per rank; flush and in_flight "
                      "alternate in one launch (--sweep); speedup = median over pairs of "
                      "in_flight tokens/s / flush tokens/s",
            "pairs": ratios, "speedup": statistics.median(ratios) if ratios else None,
            "target": IN_FLIGHT_TARGET, "rows": rows, "log": log}


# ---- the report ----------------------------------------------------------------------------

def build_report(overhead: dict | None, baseline: dict | None, scaling: dict,
                 env: dict, wall_s: float, notes: dict | None = None,
                 schedules: dict | None = None) -> dict:
    arms = (overhead or {}).get("arms", {})
    ratio = arms.get("gptbench_hf", {}).get("ratio_to_bare")
    ds = arms.get("gptbench_deepspeed", {})
    compile_speedup = arms.get("gptbench_compiled", {}).get("ratio_to_eager")
    in_flight = (schedules or {}).get("speedup")
    return {
        "compile_speedup": compile_speedup,
        "compile_target": COMPILE_TARGET,
        "compile_passed": compile_speedup >= COMPILE_TARGET if compile_speedup else None,
        "compile_s": (overhead or {}).get("compile_s"),
        "pipeline_in_flight_speedup": in_flight,
        "pipeline_in_flight_target": IN_FLIGHT_TARGET,
        "pipeline_in_flight_passed": in_flight >= IN_FLIGHT_TARGET if in_flight else None,
        "pipeline_schedules": schedules,
        "schema": SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": env.get("git_commit"),
        "config": os.path.relpath(CONFIG, ROOT),
        "overhead_ratio": ratio,
        "overhead_target": OVERHEAD_TARGET,
        "overhead_passed": ratio >= OVERHEAD_TARGET if ratio is not None else None,
        "overhead_ratio_cpu_time": arms.get("gptbench_hf", {}).get("cpu_time_ratio_to_bare"),
        "overhead_ratio_deepspeed": ds.get("ratio_to_bare"),
        "overhead_deepspeed_skipped": ds.get("skipped"),
        "overhead": overhead,
        "scaling_baseline": baseline,
        "scaling": scaling,
        "env": env,
        "notes": notes or {},
        "wall_s": wall_s,
    }


def format_table(report: dict) -> str:
    lines = []
    o = report.get("overhead")
    if o:
        lines.append(f"overhead ({o['model']['preset'] or o['model']['name']}, "
                     f"{o['model']['params'] / 1e6:.1f}M params, {o['workload']['dtype']}, "
                     f"batch {o['workload']['batch_size']}, {o['workload']['input_len']}->"
                     f"{o['workload']['output_len']} tokens x {o['workload']['batches']} "
                     f"batches, {o['threads']} thread(s), {o['pairs']} paired batches)")
        lines.append(f"  {'arm':<22}{'tokens/s (median)':>19}{'ratio to bare':>15}"
                     f"{'CPU-time ratio':>16}{'same tokens':>13}")
        for name, arm in o["arms"].items():
            if arm.get("tokens_per_s") is None:
                lines.append(f"  {name:<22}  skipped: {arm.get('skipped')}")
                continue
            lines.append(f"  {name:<22}{arm['tokens_per_s_median']:>19.1f}"
                         f"{fmt(arm.get('ratio_to_bare'), '.3f', '1'):>15}"
                         f"{fmt(arm.get('cpu_time_ratio_to_bare'), '.3f', '1'):>16}"
                         f"{fmt(arm.get('tokens_match_bare'), '', 'ref'):>13}")
        ratio = report["overhead_ratio"]
        lines.append(f"  overhead_ratio {fmt(ratio, '.3f')} (target >= "
                     f"{report['overhead_target']}): "
                     f"{verdict(report['overhead_passed'] if ratio else None)}; the arm medians are not "
                     "paired, the ratios are")
        speed = report.get("compile_speedup")
        lines.append(f"  compile_speedup {fmt(speed, '.2f')} (compiled / eager DeepSpeed "
                     f"engine, target >= {report['compile_target']}): "
                     f"{verdict(report.get('compile_passed'))}; compiled in "
                     f"{fmt(report.get('compile_s'), '.1f')} s (untimed warm-up)")
    sched = report.get("pipeline_schedules")
    if sched:
        lines.append("")
        lines.append(f"pipeline schedules (pp=2, m=2, 2 ranks, alternating in one launch): "
                     f"in_flight / flush = {fmt(sched.get('speedup'), '.2f')} "
                     f"(pairs {', '.join(f'{r:.2f}' for r in sched['pairs']) or '-'}; target "
                     f">= {sched['target']}): {verdict(report.get('pipeline_in_flight_passed'))}")
        for r in sched["rows"].values():
            lines.append(f"  {r['run_id']:<24}{fmt(r.get('throughput_tokens_per_s'), '.1f'):>10}"
                         f" tokens/s, TPOT p50 {fmt(r.get('tpot_ms_p50'), '.2f')} ms, parity "
                         f"{fmt(r.get('parity_passed'), '')}, {r['status']}")
    rows = dict(report.get("scaling") or {})
    if report.get("scaling_baseline"):
        rows = {"1 rank (baseline)": report["scaling_baseline"], **rows}
    if rows:
        lines.append("")
        lines.append("scaling (deepspeed launcher, gloo, 1 thread per rank)")
        head = (f"  {'strategy':<22}{'ranks':>6}{'tokens/s':>10}{'speedup':>9}{'eff.':>7}"
                f"{'comm':>7}{'bubble':>8}{'TPOT p50 ms':>13}{'cv':>7}{'parity':>8}  status")
        lines.append(head)
        for name, r in rows.items():
            bubble = r.get("bubble_fraction_measured")
            lines.append(
                f"  {name:<22}{r['ranks']:>6}{fmt(r['throughput_tokens_per_s'], '.1f'):>10}"
                f"{fmt(r['speedup'], '.2f'):>9}{fmt(r['parallel_efficiency'], '.2f'):>7}"
                f"{fmt(r['comm_fraction'], '.1%'):>7}{fmt(bubble, '.1%'):>8}"
                f"{fmt(r['tpot_ms_p50'], '.2f'):>13}"
                f"{fmt(r.get('throughput_cv_pct'), '.0f'):>6}%"
                f"{fmt(r['parity_passed'], ''):>8}  {r['status']}"
                + (f": {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def main(output_dir: str = "reports/bench-cpu", config_path: str = CONFIG,
         overrides: list[str] = (), repeats: int = REPEATS, with_deepspeed: bool = True,
         scaling: bool = True) -> int:
    from gptbench import envinfo, results

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    notes = {"load_avg_1m_before": _load_avg()}
    print("bench-cpu: overhead (one process) ...", flush=True)
    overhead = None
    try:
        overhead = measure_overhead(config_path, overrides, repeats, with_deepspeed)
    except Exception as e:  # noqa: BLE001 - the scaling runs are still worth having
        notes["overhead_error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        print(f"bench-cpu: overhead failed: {notes['overhead_error']}", file=sys.stderr)
    baseline, rows, schedules = None, {}, None
    if scaling:
        baseline, rows = measure_scaling(output_dir, config_path, overrides)
        schedules = measure_schedules(output_dir, config_path, overrides)
    else:
        notes["scaling"] = "not run (scaling=False)"
    notes["load_avg_1m_after"] = _load_avg()
    notes["load"] = load_note(notes["load_avg_1m_before"], os.cpu_count() or 1)
    report = build_report(overhead, baseline, rows, envinfo.collect_env(torch.device("cpu")),
                          time.time() - started, notes, schedules)
    path = os.path.join(output_dir, "bench.json")
    results.write_json_atomic(path, report)
    print()
    print(format_table(report))
    print(f"\n{notes['load']}")
    print(f"bench-cpu: wrote {path}")
    measured = overhead is not None or any(r["status"] == "ok" for r in rows.values())
    return 0 if measured else 1


def load_note(load_before: float | None, cpus: int) -> str:
    """Whether other work shared the CPUs: every number here assumes it did not."""
    if load_before is None:
        return "load average unknown: check that nothing else ran during the benchmark"
    if load_before > 0.5:
        return (f"WARNING: load average {load_before} on {cpus} CPUs before the benchmark: "
                "other processes shared the cores, so timings (scaling most of all) are "
                "noisy; rerun on an idle machine")
    return f"load average {load_before} on {cpus} CPUs before the benchmark (idle)"


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
