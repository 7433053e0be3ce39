"""Single-GPU proofs of the multi-GPU path, run by `make gpu-check` (scripts/gpu_check.sh)
in its one call, each bounded in time.

A proof is a function (device, budget_s) -> {"name", "ok", "details"}: ok is True or False
for a proof that ran, None when it was skipped (details["skipped"] says why). `PROOFS`
is the registry, in the order they run; a proof that raises is recorded as failed and the
others still run.

- nccl_one_rank_cuda_graph: real NCCL with one rank: a compiled function whose
  `dist.all_reduce` on a one-rank group is captured in a CUDA graph (reduce-overhead) and
  replayed 100 times, then a clean `destroy_process_group`. CUDA only.
- in_flight_event_timing: the in-flight schedule's timing in one process: two stages on
  two streams, event-ordered copies standing in for isend/recv, token times read from events
  after the batch. The host must run ahead of the device (it finishes issuing before the
  last token is computed) and the tokens must equal a one-stream reference. On CPU the
  same code runs with a host-clock stand-in for the streams and events.
- four_ranks_compiling: four processes compiling a model at once on this machine (GPT-2 XL
  on CUDA, the tiny preset on CPU): the spread of their compile times against the watchdog
  timeout `engine.comm_timeout_s: auto` would choose (gptbench/watchdog.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from gptbench.compiled import InductorOptions
from gptbench.errors import UserError


def _result(name: str, ok, **details) -> dict:
    return {"name": name, "ok": ok, "details": details}


def skipped(name: str, reason: str) -> dict:
    return _result(name, None, skipped=reason)


# ---- (b) NCCL with one rank, captured and replayed ------------------------------------------

def nccl_one_rank_cuda_graph(device: torch.device, budget_s: float, replays: int = 100) -> dict:
    name = "nccl_one_rank_cuda_graph"
    if device.type != "cuda":
        return skipped(name, "needs CUDA: NCCL and CUDA graphs")
    import datetime

    import torch.distributed as dist

    from gptbench import compiled
    from gptbench.worker import _free_port

    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=budget_s),
                            device_id=device)
    try:
        group = dist.new_group([0])
        x = torch.arange(1024, dtype=torch.float32, device=device)

        def step(x):
            y = x * 2
            dist.all_reduce(y, group=group)  # a world of one: y stays x * 2
            return y + 1

        fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        from torch._dynamo.utils import counters

        skips_before = counters["inductor"]["cudagraph_skips"]
        before = compiled.snapshot()
        for _ in range(compiled.WARMUP_CALLS):  # compile, record, replay
            compiled.mark_step()
            fn(x)
        stats = compiled.CompileStats.since(before)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        right = 0
        for _ in range(replays):
            compiled.mark_step()
            out = fn(x)
            right += bool(torch.equal(out, x * 2 + 1))
        torch.cuda.synchronize(device)
        replay_us = (time.perf_counter() - start) / replays * 1e6
        skips = counters["inductor"]["cudagraph_skips"] - skips_before
    finally:
        dist.destroy_process_group()
    destroyed = not dist.is_initialized()
    ok = right == replays and skips == 0 and stats.graph_breaks == 0 and destroyed
    return _result(name, ok, replays=replays, correct_replays=right, cudagraph_skips=skips,
                   graph_breaks=stats.graph_breaks, graphs=stats.graphs,
                   compile_s=stats.compile_s, us_per_replay_with_check=replay_us,
                   destroyed_cleanly=destroyed)


# ---- (c) the in-flight schedule's event timing on two streams -----------------------------

class DeviceClock:
    """Streams and timing events on CUDA; on CPU a host-clock stand-in with the same calls
    (work there runs when issued, so a 'stream' is no context and a mark is the clock)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def stream(self):
        return torch.cuda.Stream(self.device) if self.cuda else None

    def on(self, stream):
        import contextlib

        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def mark(self, stream):
        """A point in `stream`'s work, readable after the batch."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def wait(self, stream, mark) -> None:
        """`stream` waits for the work before `mark` (the stand-in for recv after isend)."""
        if self.cuda:
            stream.wait_event(mark)

    def hand_over(self, tensor: torch.Tensor, stream) -> torch.Tensor:
        """`tensor`, made on another stream, is used on `stream`: the caching allocator
        must not reuse its memory before `stream` is done with it."""
        if self.cuda:
            tensor.record_stream(stream)
        return tensor

    def seconds(self, start, marks: list[list]) -> list[list[float]]:
        if not self.cuda:
            return [[m - start for m in row] for row in marks]
        torch.cuda.synchronize(self.device)
        return [[start.elapsed_time(m) / 1e3 for m in row] for row in marks]


def two_stage_schedule(device: torch.device, d: int, mb: int, m: int, steps: int,
                       layers: int = 4, seed: int = 0) -> dict:
    """m micro-batches through two stages for `steps` tokens, the in-flight way: stage 0 on
    one stream, stage 1 on another, each hop an event-ordered copy; the last stage picks a
    token, which goes back to stage 0 for the micro-batch's next step. Returns the tokens,
    each token's time (events, read after the batch), when the host finished issuing, and
    the tokens of the same computation on one stream in order (the reference)."""
    g = torch.Generator().manual_seed(seed)
    vocab = 64
    w0 = [torch.randn(d, d, generator=g).div_(d ** 0.5).to(device) for _ in range(layers)]
    w1 = [torch.randn(d, d, generator=g).div_(d ** 0.5).to(device) for _ in range(layers)]
    embed = torch.randn(vocab, d, generator=g).to(device)
    head = torch.randn(d, vocab, generator=g).to(device)
    first = torch.randint(0, vocab, (m, mb), generator=g).to(device)

    def stage0(tokens):
        x = embed[tokens]  # (mb, d)
        for w in w0:
            x = torch.tanh(x @ w)
        return x

    def stage1(x):
        for w in w1:
            x = torch.tanh(x @ w)
        return (x @ head).argmax(-1)  # (mb,)

    clock = DeviceClock(device)
    s0, s1 = clock.stream(), clock.stream()
    inputs = [first[k].clone() for k in range(m)]
    if clock.cuda:
        torch.cuda.synchronize(device)  # weights and inputs made on the default stream
    host_start = time.perf_counter()
    start = clock.mark(s0)
    tokens = [[] for _ in range(m)]
    marks = [[] for _ in range(m)]
    back = [None] * m  # the event after which micro-batch k's token is in stage 0's buffer
    for _ in range(steps):
        for k in range(m):
            with clock.on(s0):
                if back[k] is not None:
                    clock.wait(s0, back[k])  # recv of the token
                    clock.hand_over(inputs[k], s0)
                hidden = stage0(inputs[k])
                sent = clock.mark(s0)        # isend of the activations
            with clock.on(s1):
                clock.wait(s1, sent)
                received = torch.empty_like(clock.hand_over(hidden, s1)).copy_(hidden)
                token = stage1(received)
                marks[k].append(clock.mark(s1))
                tokens[k].append(token)
                inputs[k] = token.clone()    # the token's way back to stage 0
                back[k] = clock.mark(s1)
    host_issue_s = time.perf_counter() - host_start  # no sync yet: what the host took
    seconds = clock.seconds(start, marks)
    reference = []
    for k in range(m):
        x, row = first[k], []
        for _ in range(steps):
            x = stage1(stage0(x))
            row.append(x)
        reference.append(torch.stack(row, 1))
    got = torch.cat([torch.stack(t, 1) for t in tokens])
    return {"tokens_match": bool(torch.equal(got, torch.cat(reference))),
            "token_s": seconds, "host_issue_s": host_issue_s}


def in_flight_event_timing(device: torch.device, budget_s: float, steps: int = 16,
                           m: int = 2) -> dict:
    name = "in_flight_event_timing"
    cuda = device.type == "cuda"
    d, mb = (4096, 256) if cuda else (64, 4)  # on a GPU each matmul outlasts its launch
    two_stage_schedule(device, d, mb, m, 2)  # warm-up: kernels loaded, allocator primed
    out = two_stage_schedule(device, d, mb, m, steps)
    times = out["token_s"]
    last_token_s = max(row[-1] for row in times)
    issue_s = out["host_issue_s"]
    increasing = all(b > a for row in times for a, b in zip(row, row[1:]))
    complete = all(len(row) == steps for row in times) and all(t > 0 for row in times
                                                               for t in row)
    ran_ahead = issue_s < last_token_s if cuda else None
    ok = out["tokens_match"] and increasing and complete and ran_ahead is not False
    return _result(name, ok, micro_batches=m, steps=steps, width=d, micro_batch_size=mb,
                   tokens_match=out["tokens_match"], token_times_increasing=increasing,
                   token_times_complete=complete, last_token_s=last_token_s,
                   host_issue_s=issue_s, host_ran_ahead=ran_ahead,
                   clock="CUDA events on two streams" if cuda
                   else "host clock stand-in (CPU work runs when issued: no running ahead)",
                   tpot_ms_per_micro_batch=[1e3 * (row[-1] - row[0]) / max(1, steps - 1)
                                            for row in times])


# ---- (d) four processes compiling at once ------------------------------------------------

@dataclass(frozen=True)
class TraceOnly(InductorOptions):
    """dynamo's tracing without inductor (backend="eager"): the proof's machinery in
    seconds, for tests on a CPU."""

    def compile(self, fn):
        return torch.compile(fn, fullgraph=True, dynamic=False, backend="eager")


def _compile_rank(index: int, preset: str | None, name: str, mode: str, backend: str,
                  device_name: str, barrier, queue) -> None:
    """One process: load, wait for the others, compile prefill and decode, report."""
    try:
        from gptbench import compiled
        from gptbench.models import load_model
        from gptbench.strategies.base import StepLM

        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        started = time.perf_counter()
        model = load_model(name, "random", preset, dtype, device)
        load_s = time.perf_counter() - started
        options = (compiled.InductorOptions(mode=mode) if backend == "inductor"
                   else TraceOnly(mode="default"))
        lm = StepLM(model, options, 40, device, dtype)  # gptbench's step, as the runs use it
        ids = torch.zeros((4, 32), dtype=torch.long, device=device)
        barrier.wait(timeout=600)
        begin = time.time()
        before = compiled.snapshot()
        with torch.no_grad(), compiled.compiling(options):
            for _ in range(compiled.WARMUP_CALLS):
                step = lm.prefill(ids)
                for _ in range(2):
                    step = lm.decode(step.tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = compiled.CompileStats.since(before)
        queue.put({"process": index, "load_s": load_s, "start_unix_s": begin,
                   "end_unix_s": time.time(), "compile_s": stats.compile_s,
                   "graph_breaks": stats.graph_breaks})
    except Exception as e:  # noqa: BLE001 - the proof reports what each process hit
        barrier.abort()  # the others leave their wait instead of hanging on this one
        queue.put({"process": index, "error": " ".join(f"{type(e).__name__}: {e}".split())[:300]})


def four_ranks_compiling(device: torch.device, budget_s: float, processes: int = 4,
                         preset: str | None = None, backend: str = "inductor") -> dict:
    import multiprocessing as mp
    import queue as _queue

    from gptbench import watchdog
    from gptbench.compiled import effective_mode
    from gptbench.models import ARCHITECTURES, PRESETS

    name = "four_ranks_compiling"
    cuda = device.type == "cuda"
    model = preset or ("gpt2-xl" if cuda else "tiny")
    preset_arg = model if model in PRESETS else None
    n_layer = (PRESETS.get(model) or ARCHITECTURES[model])["n_layer"]
    mode = effective_mode("reduce-overhead", device.type)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    chosen, why = watchdog.choose_comm_timeout("auto", device.type, mode, n_layer, 1,
                                               processes, cpus or 1)
    ctx = mp.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_compile_rank, args=(i, preset_arg, model, mode, backend,
                                                     str(device), barrier, q))
             for i in range(processes)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + budget_s
    deadline_unix_s = time.time() + budget_s
    reports: dict[int, dict] = {}
    while len(reports) < processes and time.monotonic() < deadline:
        try:
            r = q.get(timeout=min(1.0, max(0.05, deadline - time.monotonic())))
            reports[r["process"]] = r
        except _queue.Empty:
            if not any(p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()) if p.is_alive() else 0)
        if p.is_alive():
            p.kill()
            p.join(5)
    done = [r for r in reports.values() if "error" not in r]
    errors = [f"process {r['process']}: {r['error']}" for r in reports.values() if "error" in r]
    ends = [r["end_unix_s"] for r in done]
    spread = max(ends) - min(ends) if len(done) == processes else None
    # some finished, the rest were stopped at the deadline: the spread is at least this
    at_least = deadline_unix_s - min(ends) if done and spread is None else None
    slowest = max(r["end_unix_s"] - r["start_unix_s"] for r in done) if done else None
    ok = spread is not None and spread < chosen
    return _result(name, ok, model=model, mode=mode, backend=backend, processes=processes,
                   cpus=cpus, finished=len(done), errors=errors,
                   timed_out=len(reports) < processes, budget_s=budget_s,
                   compile_wall_s=[r["end_unix_s"] - r["start_unix_s"] for r in done],
                   compile_s=[r["compile_s"] for r in done],
                   load_s=[r["load_s"] for r in done],
                   spread_s=spread, spread_at_least_s=at_least, slowest_s=slowest,
                   watchdog_s=chosen,
                   watchdog_reason=why)


# ---- registry -------------------------------------------------------------------------------

# name -> (proof, share of the budget it may use)
PROOFS = {
    "nccl_one_rank_cuda_graph": (nccl_one_rank_cuda_graph, 0.2),
    "in_flight_event_timing": (in_flight_event_timing, 0.1),
    "four_ranks_compiling": (four_ranks_compiling, 0.7),
}


def run_proofs(device: torch.device, budget_s: float, names=None) -> list[dict]:
    """Every proof named (default all, in PROOFS' order), each within its share of the
    budget (plus whatever earlier proofs left); one failing never stops the others."""
    names = list(PROOFS) if names is None else list(names)
    unknown = [n for n in names if n not in PROOFS]
    if unknown:
        raise UserError(f"unknown proof {unknown[0]!r}; known: {', '.join(PROOFS)}")
    deadline = time.monotonic() + budget_s
    shares = {n: PROOFS[n][1] for n in names}
    out = []
    for i, n in enumerate(names):
        left = deadline - time.monotonic()
        rest = sum(shares[x] for x in names[i:])
        allowed = left * shares[n] / rest if rest else left
        if allowed < 5:
            out.append({**skipped(n, f"the proofs' {budget_s:.0f} s budget is spent"),
                        "wall_s": 0.0})
            continue
        started = time.monotonic()
        try:
            result = PROOFS[n][0](device, allowed)
        except Exception as e:  # noqa: BLE001 - a proof's failure is its result
            result = _result(n, False, error=" ".join(f"{type(e).__name__}: {e}".split())[:300])
        result["wall_s"] = time.monotonic() - started
        out.append(result)
        verdict = {True: "ok", False: "FAILED", None: "skipped"}[result["ok"]]
        print(f"gpu-proof {n}: {verdict} {json.dumps(result['details'], default=str)[:400]}",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptbench.gpuproofs",
                                description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--out", default="reports/gpu-check/proofs.json")
    p.add_argument("--only", action="append", help="a proof's name (repeatable)")
    a = p.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        results = run_proofs(device, a.budget_s, a.only)
    except UserError as e:
        print(f"gpu-proofs: error: {e}", file=sys.stderr)
        return 2
    from gptbench.results import write_json_atomic

    write_json_atomic(a.out, {"schema": "gptbench.gpu-proofs/1", "device": str(device),
                              "budget_s": a.budget_s, "proofs": results})
    print(f"gpu-proofs: wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
