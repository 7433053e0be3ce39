"""`make gpu-check` (scripts/gpu_check.sh): GPT-2 XL fp16 on one GPU, in one call of under
9 minutes, compilation included.

Rows, each its own launcher run of deepspeed_configs/gpu-check.yaml (random weights, batch
4, 256 -> 64 tokens) with a per-row timeout; a failing row never stops the others:
  hf_eager            the plain Hugging Face model, dynamic cache (engine.backend=hf_eager)
  deepspeed_compiled  init_inference, then gptbench's compiled step (gptbench/step.py: the
                      KV cache written in place, parameters frozen, math attention, CUDA
                      graphs; engine.compile=reduce-overhead)
  hf_compiled         Hugging Face generate with its static cache and compile config
  deepspeed_compiled_sdpa    the same step with torch's fused attention (engine.attention)
  deepspeed_compiled_tuned   the same step with coordinate-descent tuning (engine.tuning)
  deepspeed           init_inference, eager (engine.compile=off)
  ds_inject           DeepSpeed's kernel injection: refused before launch (reason below)
  ds_inject_graph     + DeepSpeed's CUDA graph: refused before launch (reason below)
  2r_tp / 2r_pp       2-rank tensor / pipeline parity when the machine has 2 GPUs; on one
                      GPU a 2-process NCCL and gloo probe on cuda:0 records what the backends
                      do, and the rows say why they did not run.
Rows run most important first, so a spent budget drops the least informative.
Each DeepSpeed row also carries its decode profile (kernels per step, GPU busy and host
time per step, and whether the step is bandwidth-, kernel- or host-bound).
Targets, on the rows whose parity passed: on one H200, the best DeepSpeed row reaches
>= 50% of the HBM roofline in decode (TPOT p50 at or below the TPOT that 50% of the card's
bandwidth implies, ~1.45 ms for this workload) and a TPOT <= 0.4x hf_compiled's, measured
in the same call. Printed as met / not met; exit 0 when any row ran, 1 when nothing could run (no
GPU: scripts/gpu_check.sh stops before Python with exit 1).

DeepSpeed kernel injection and transformers versions
----------------------------------------------------
Read from the sources; NOT run on a GPU by us (the CPU accelerator has no fused kernels).
- DeepSpeed 0.19.8 `replace_with_kernel_inject` swaps each `GPT2Block` (policy
  `HFGPT2LayerPolicy`, module_inject/containers/gpt2.py) for `DeepSpeedGPTInference`, whose
  forward (model_implementations/transformers/ds_transformer.py) keeps the old block API:
  `forward(input, input_mask, attention_mask, attn_mask, head_mask, layer_past, ...,
  use_cache, ..., past_key_value, **kwargs)`, returning the tuple `(hidden, (key, value))`
  (`return_tuple` defaults to True). Its KV cache lives in DeepSpeed's workspace, not in
  the caller's cache (`is_prompt` = more than one new token).
- transformers <= 4.51 (checked in the 4.51.3 wheel): `GPT2Model` calls
  `block(hidden, layer_past=..., attention_mask=..., head_mask=..., use_cache=...)`, reads
  `outputs[0]` and the `(key, value)` presents, and takes positions from the presents'
  length: the API the v1 container was written for.
- 4.52 (huggingface/transformers#35761, "GPT2Model StaticCache support"): the block gets
  `past_key_value=<Cache>` and `cache_position` by keyword. The injected layers never fill
  that Cache, so `get_seq_length()` stays 0 and decode positions are right only when the
  caller passes `cache_position` (generate does; gptbench's CachedLM does not).
- 4.53-4.57 (checked in 4.53.3, 4.56.2, 4.57.6): the block is called positionally,
  `block(hidden, cache, cache_position, causal_mask, head_mask[i], ...)`, so DeepSpeed's
  `input_mask`/`attention_mask` parameters receive the Cache and the int64 `cache_position`,
  which it then uses as the attention mask.
- 5.x (pinned 5.24.0): `hidden = block(hidden, cache, causal_mask, encoder_hidden_states,
  ..., position_ids=...)` expects a tensor back. With SDPA and no padding `causal_mask` is
  None (checked on CPU: block 0 receives (Tensor, DynamicCache, None, None)), so
  DeepSpeed's `input_mask` is the DynamicCache: expected failure `AttributeError:
  'DynamicCache' object has no attribute 'dtype'` in `DeepSpeedSelfAttention
  .compute_attention`; past that, the returned tuple would break `ln_f`. Expect the
  ds_inject rows to fail (or fail parity) with transformers 5.24 until gptbench drives the
  injected layers itself; gpu-check records what actually happens.
- DeepSpeed's v1-inference CI (.github/workflows/nv-inference.yml) pinned transformers
  to git commit f370bebdc (deepspeedai/DeepSpeed#4606, 2023-11-03: "nv-inference is
  failing due to changes on the transformers side"); #7139 (2025-03-14) unpinned
  transformers in most workflows. No DeepSpeed statement found that GPT-2 kernel injection
  supports transformers >= 4.52.
- CUDA graphs (`enable_cuda_graph`): InferenceEngine captures the first forward's shapes
  and replays that graph after `copy_`-ing later tensor inputs into the captured ones
  (inference/engine.py `_create_cuda_graph`/`_graph_replay`). In a generation the first
  forward is the prefill (4, 256): every decode step (4, 1) would be broadcast into the
  prefill's input buffer and replay the prefill, i.e. wrong tokens. gptbench therefore
  refuses engine.cuda_graph with tp>1 or without kernel injection, and captures CUDA graphs
  its own way (torch.compile mode="reduce-overhead" over a static KV cache: one graph per
  shape, prefill and decode).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from gptbench.benchfmt import fmt, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "deepspeed_configs", "gpu-check.yaml")
SCHEMA = "gptbench.gpu-check/1"
# proofs + rows + probes + the emulated suite + the fake-group proof (scripts/gpu_check.sh
# splits it); the script's installs come on top (< 9 min total)
BUDGET_S = 500.0
MIN_ROW_S = 45.0          # a row given less than this is not started
ROOFLINE_TARGET = 0.5
TPOT_RATIO_TARGET = 0.4   # the best DeepSpeed row's TPOT over hf_compiled's
GiB = 2 ** 30


@dataclass(frozen=True)
class Row:
    name: str
    ranks: int
    overrides: tuple
    timeout_s: float


ROWS = (
    Row("hf_eager", 1, ("engine.backend=hf_eager",), 120),
    # compiling GPT-2 XL's prefill and decode graphs takes a minute or two on one GPU
    Row("deepspeed_compiled", 1, ("engine.compile=reduce-overhead",), 240),
    Row("hf_compiled", 1, ("engine.backend=hf_compiled",), 200),
    Row("deepspeed_compiled_sdpa", 1, ("engine.compile=reduce-overhead",
                                       "engine.attention=sdpa"), 200),
    Row("deepspeed_compiled_tuned", 1, ("engine.compile=reduce-overhead",
                                        "engine.tuning=coordinate_descent"), 240),
    Row("deepspeed", 1, ("engine.compile=off",), 120),
    Row("ds_inject", 1, ("engine.kernel_inject=true",), 60),
    Row("ds_inject_graph", 1, ("engine.kernel_inject=true", "engine.cuda_graph=true"), 60),
    Row("2r_tp", 2, ("strategy=tensor_data_hybrid", "topology.tp=2"), 150),
    Row("2r_pp", 2, ("strategy=pipeline_data_hybrid", "topology.pp=2"), 150),
)


def summarize_record(row: Row, record: dict) -> dict:
    """The table's view of one run record."""
    m = record.get("metrics") or {}
    roof = m.get("roofline") or {}
    parity = record.get("parity") or {}
    peak = (m.get("peak_memory_bytes") or {}).get("max")
    return {
        "row": row.name, "ranks": row.ranks, "overrides": list(row.overrides),
        "run_id": record.get("run_id"), "status": record.get("status"),
        "error": record.get("error"),
        "backend": (record.get("engine") or {}).get("backend"),
        "tokens_per_s": m.get("throughput_tokens_per_s"),
        "ttft_ms_p50": (m.get("ttft_ms") or {}).get("p50"),
        "tpot_ms_p50": (m.get("tpot_ms") or {}).get("p50"),
        "peak_memory_bytes": peak,
        "roofline_fraction": roof.get("fraction_of_peak"),
        "achieved_gbps": roof.get("achieved_gbps"),
        "bytes_per_decode_step": roof.get("bytes_per_decode_step"),
        "device_peak_gbps": roof.get("device_peak_gbps"),
        "parity_passed": parity.get("passed"),
        "token_match_rate": parity.get("token_match_rate"),
        "max_abs_logit_diff": parity.get("max_abs_logit_diff"),
        "compile": (record.get("engine") or {}).get("compile"),
        "compile_s": m.get("compile_s"),
        "graph_breaks": m.get("graph_breaks"),
        "wall_s": record.get("wall_s"),
        "device_name": (record.get("env") or {}).get("device_name"),
        "decode_profile": m.get("decode_profile"),
        "decode_graph": (m.get("compile") or {}).get("decode_graph"),
        "cudagraph_skips": (m.get("compile") or {}).get("cudagraph_skips"),
    }


def not_run(row: Row, reason: str) -> dict:
    return {**dict.fromkeys(summarize_record(row, {})), "row": row.name, "ranks": row.ranks,
            "overrides": list(row.overrides), "status": "not_run", "error": reason}


def run_row(row: Row, output_dir: str, deadline: float) -> dict:
    from gptbench import launcher
    from gptbench.errors import UserError

    left = deadline - time.monotonic()
    sets = list(row.overrides) + [f"run_id=gpu-{row.name}", f"output_dir={output_dir}"]
    try:  # what gptbench refuses is known before any process starts: no GPU time spent
        launcher.prepare(CONFIG, sets, ranks=row.ranks)
    except UserError as e:
        out = not_run(row, str(e))
        out["status"] = "refused"
        print(f"gpu-check: {row.name}: refused: {e}", flush=True)
        return out
    if left < MIN_ROW_S:
        return not_run(row, f"gpu-check's {BUDGET_S:.0f} s budget is spent ({left:.0f} s left)")
    timeout = min(row.timeout_s, left)
    sets.append(f"timeout_s={timeout:.0f}")
    log = os.path.join(output_dir, "logs", f"{row.name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    print(f"gpu-check: {row.name} (timeout {timeout:.0f} s, log {log}) ...", flush=True)
    try:
        record = launcher.run(CONFIG, sets, ranks=row.ranks, log_path=log)
    except Exception as e:  # noqa: BLE001 - a row's failure is its result; the rest still run
        out = not_run(row, " ".join(f"{type(e).__name__}: {e}".split())[:300])
        out["status"] = "failed"
        return out
    out = summarize_record(row, record)
    out["log"] = log
    print(f"  {out['status']}: {fmt(out['tokens_per_s'], '.1f')} tokens/s, parity "
          f"{fmt(out['parity_passed'], '')}" + (f" - {out['error']}" if out["error"] else ""),
          flush=True)
    return out


# ---- two ranks on one GPU -----------------------------------------------------------------

def _probe_rank(rank: int, backend: str, port: int, queue) -> None:
    """One of two processes on cuda:0: all_reduce, broadcast and send/recv, checked."""
    import datetime

    import torch
    import torch.distributed as dist

    try:
        torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=30))
        x = torch.full((8,), float(rank + 1), device="cuda:0")
        dist.all_reduce(x)
        y = torch.full((8,), float(rank), device="cuda:0")
        dist.broadcast(y, src=1)
        z = torch.full((8,), 7.0 if rank == 0 else 0.0, device="cuda:0")
        if rank == 0:
            dist.send(z, dst=1)
        else:
            dist.recv(z, src=0)
        torch.cuda.synchronize()
        ok = bool((x == 3).all() and (y == 1).all() and (z == 7).all())
        queue.put((rank, "ok" if ok else "wrong results", ""))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the probe reports whatever the backend says
        queue.put((rank, "error", " ".join(f"{type(e).__name__}: {e}".split())[:400]))


def probe_two_ranks_one_gpu(backend: str, timeout_s: float = 60.0) -> str:
    """What `backend` does with 2 processes on one GPU: 'ok: ...', 'error: ...' or 'hung'."""
    import multiprocessing as mp
    import queue as _queue

    from gptbench.worker import _free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_probe_rank, args=(r, backend, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.1, end - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    answers = {}
    while True:
        try:
            rank, status, detail = q.get(timeout=0.5)
        except _queue.Empty:
            break
        answers[rank] = (status, detail)
    errors = [f"rank {r}: {d}" for r, (s, d) in sorted(answers.items()) if s == "error"]
    if errors:
        return "error: " + "; ".join(errors)
    if hung or len(answers) < 2:
        return f"hung: no answer from {2 - len(answers)} rank(s) within {timeout_s:.0f} s (killed)"
    if all(s == "ok" for s, _ in answers.values()):
        return "ok: all_reduce, broadcast and send/recv correct with 2 ranks on cuda:0"
    return "wrong results from " + ", ".join(f"rank {r}" for r, (s, _) in answers.items()
                                              if s != "ok")


def two_rank_rows(rows: tuple, output_dir: str, deadline: float, gpus: int) -> tuple[list, dict]:
    """Run the 2-rank rows on >= 2 GPUs; on one GPU, probe the backends and say why not."""
    if gpus >= 2:
        return [run_row(r, output_dir, deadline) for r in rows], {}
    probes = {}
    for backend in ("nccl", "gloo"):
        if deadline - time.monotonic() < 70:
            probes[backend] = "not run: gpu-check's time budget is spent"
            continue
        print(f"gpu-check: probing {backend} with 2 ranks on cuda:0 ...", flush=True)
        probes[backend] = probe_two_ranks_one_gpu(backend)
        print(f"  {backend}: {probes[backend]}", flush=True)
    reason = (f"{gpus} GPU visible: gptbench gives each rank its own GPU (runplan.select_device "
              "refuses local rank 1) and DeepSpeed/gptbench use NCCL on CUDA; probe with 2 "
              f"ranks on cuda:0 - nccl: {probes['nccl']}; gloo: {probes['gloo']}")
    return [not_run(r, reason) for r in rows], probes


def run_stage_probe(deadline: float) -> dict:
    """Compiled pipeline stages on one GPU (gptbench/stage_probe.py), budget permitting."""
    import torch

    from gptbench import stage_probe

    if deadline - time.monotonic() < 60:
        return {"status": "not_run", "error": "gpu-check's time budget is spent"}
    print("gpu-check: one compiled pipeline stage, 2 micro-batches interleaved ...", flush=True)
    try:
        out = stage_probe.probe(torch.device("cuda", 0), torch.float16, "reduce-overhead")
    except Exception as e:  # noqa: BLE001 - a probe's failure is its result
        return {"status": "failed", "error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    out["status"] = "ok"
    print(f"  {format_stage_probe(out)}", flush=True)
    return out


def format_stage_probe(p: dict) -> str:
    if p.get("status") != "ok":
        return f"stage probe: {p.get('status')}: {p.get('error')}"
    return (f"stage probe ({p['preset']} preset, batch {p['batch']} as {p['micro_batches']} "
            f"micro-batches interleaved): decode step {p['eager']['decode_step_ms']:.2f} ms "
            f"eager, {p['compiled']['decode_step_ms']:.2f} ms compiled ({p['speedup']:.1f}x; "
            f"{p['compiled']['graphs']} graphs), tokens agree {p['token_match_rate']:.0%}")


# ---- targets and table ---------------------------------------------------------------------

def evaluate_targets(rows: list[dict]) -> dict:
    """The two targets on the rows that ran and passed parity."""
    good = [r for r in rows if r["status"] == "ok" and r["parity_passed"] and r["ranks"] == 1]
    baseline = next((r for r in good if r["backend"] == "hf_compiled"), None)
    ds = [r for r in good if r["backend"] == "deepspeed" and r["tokens_per_s"]]
    best = max(ds, key=lambda r: r["tokens_per_s"]) if ds else None
    out = {"best_deepspeed_row": best["row"] if best else None,
           "roofline": {"target_fraction": ROOFLINE_TARGET, "fraction": None,
                        "tpot_ms_p50": None, "tpot_ms_at_target": None, "met": None},
           "tpot_vs_hf_compiled": {"target": TPOT_RATIO_TARGET, "ratio": None, "met": None},
           "reasons": []}
    if best is None:
        out["reasons"].append("no DeepSpeed row ran with parity passed")
        return out
    roof = out["roofline"]
    roof["fraction"], roof["tpot_ms_p50"] = best["roofline_fraction"], best["tpot_ms_p50"]
    if best["bytes_per_decode_step"] and best["device_peak_gbps"]:
        roof["tpot_ms_at_target"] = (best["bytes_per_decode_step"]
                                     / (ROOFLINE_TARGET * best["device_peak_gbps"] * 1e9) * 1e3)
    if best["roofline_fraction"] is None:
        out["reasons"].append("the card's peak bandwidth is unknown to gptbench.roofline")
    else:
        roof["met"] = best["roofline_fraction"] >= ROOFLINE_TARGET
    if baseline is None or not baseline["tpot_ms_p50"] or not best["tpot_ms_p50"]:
        out["reasons"].append("hf_compiled did not run with parity passed")
    else:
        ratio = best["tpot_ms_p50"] / baseline["tpot_ms_p50"]
        out["tpot_vs_hf_compiled"].update(ratio=ratio, met=ratio <= TPOT_RATIO_TARGET)
    return out


def format_table(report: dict) -> str:
    lines = [f"gpu-check on {report['device_name']} (GPT-2 XL, random weights, fp16, "
             "batch 4, 256 -> 64 tokens)",
             f"  {'row':<20}{'tokens/s':>10}{'TTFT p50':>10}{'TPOT p50':>10}{'peak GiB':>10}"
             f"{'HBM roof':>10}{'compile s':>11}{'parity':>8}  status"]
    for r in report["rows"]:
        peak = r["peak_memory_bytes"] / GiB if r["peak_memory_bytes"] else None
        lines.append(f"  {r['row']:<20}{fmt(r['tokens_per_s'], '.1f'):>10}"
                     f"{fmt(r['ttft_ms_p50'], '.1f'):>10}{fmt(r['tpot_ms_p50'], '.2f'):>10}"
                     f"{fmt(peak, '.2f'):>10}{fmt(r['roofline_fraction'], '.1%'):>10}"
                     f"{fmt(r.get('compile_s'), '.0f'):>11}"
                     f"{fmt(r['parity_passed'], ''):>8}  {r['status']}"
                     + (f": {r['error'][:160]}" if r.get("error") else ""))
    for r in report["rows"]:
        if r.get("decode_profile"):
            lines.append(f"  {r['row']}: {format_decode_profile(r['decode_profile'])}")
        g = r.get("decode_graph")
        if g:
            lines.append(f"  {r['row']}: decode graph {g['inputs']} inputs, {g['cache_copies']} "
                         f"cache copies, {g['launches']} launches; CUDA-graph skips "
                         f"{fmt(r.get('cudagraph_skips'), 'd')}")
    t = report["targets"]
    roof, ratio = t["roofline"], t["tpot_vs_hf_compiled"]
    lines.append(f"targets (stated for one H200; best DeepSpeed row: {t['best_deepspeed_row']})")
    lines.append(f"  decode >= {roof['target_fraction']:.0%} of the HBM roofline: "
                 f"{verdict(roof['met'])} ({fmt(roof['fraction'], '.1%')}; TPOT p50 "
                 f"{fmt(roof['tpot_ms_p50'], '.2f')} ms, target <= "
                 f"{fmt(roof['tpot_ms_at_target'], '.2f')} ms)")
    lines.append(f"  TPOT <= {ratio['target']:g}x hf_compiled's: {verdict(ratio['met'])} "
                 f"({fmt(ratio['ratio'], '.2f')}x)")
    for reason in t["reasons"]:
        lines.append(f"  note: {reason}")
    if report.get("stage_probe"):
        lines.append(format_stage_probe(report["stage_probe"]))
    return "\n".join(lines)


def format_decode_profile(p: dict) -> str:
    return (f"decode step {fmt(p.get('step_ms'), '.3f')} ms: "
            f"{fmt(p.get('kernels_per_step'), '.0f')} kernels, GPU busy "
            f"{fmt(p.get('busy_ms_per_step'), '.3f')} ms, host {fmt(p.get('host_ms_per_step'), '.3f')} ms"
            f" per step; {fmt(p.get('fraction_of_floor'), '.0%')} of the bandwidth floor "
            f"({fmt(p.get('floor_ms'), '.3f')} ms): {p.get('verdict')}")


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def main(output_dir: str = "reports/gpu-check", budget_s: float = BUDGET_S) -> int:
    import torch

    from gptbench import envinfo, results

    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}); nothing to check",
              file=sys.stderr)
        return 1
    gpus = torch.cuda.device_count()
    name = _gpu_name() or "unknown GPU"
    print(f"gpu-check: {gpus} GPU(s): {name}", flush=True)
    started = time.monotonic()
    deadline = started + budget_s
    single = [r for r in ROWS if r.ranks == 1]  # in ROWS' order: most important first
    rows = [run_row(r, output_dir, deadline) for r in single]
    two, probes = two_rank_rows(tuple(r for r in ROWS if r.ranks == 2), output_dir, deadline,
                                gpus)
    rows += two
    stage = run_stage_probe(deadline)
    device_name = next((r["device_name"] for r in rows if r.get("device_name")), name)
    report = {
        "schema": SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name, "nvidia_smi": name, "gpus": gpus,
        "config": os.path.relpath(CONFIG, ROOT),
        "toolchain": {"nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"),
                      "CUDA_HOME": os.environ.get("CUDA_HOME")},
        "rows": rows,
        "two_rank_probes": probes,
        "stage_probe": stage,
        "targets": evaluate_targets(rows),
        "env": envinfo.collect_env(torch.device("cuda", 0)),  # after the runs: no context before
        "wall_s": time.monotonic() - started,
    }
    path = os.path.join(output_dir, "gpu-check.json")
    results.write_json_atomic(path, report)
    print()
    print(format_table(report))
    print(f"gpu-check: wrote {path} and the run records in {os.path.join(output_dir, 'runs')}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gptbench.gpucheck",
                                description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="reports/gpu-check")
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(sys.argv[1:])
    sys.exit(main(args.output_dir, args.budget_s))
