"""All-reduces as a decode step makes them: each after a stretch of compute, not back to back.

`gptbench diagnose --comm` times an all-reduce right after a barrier, with every rank
awake. Inside a tensor-parallel step a rank computes (half a block) between all-reduces, so
gloo's threads have gone to sleep by the time the next one is issued. On the 2-core CPU
machine this is the difference between ~0.14 ms (back to back) and ~1.0-1.3 ms (after
100-1000 us of compute) per 1 KB all-reduce between 2 processes, and the latter is what a
real 2-rank tensor-parallel step pays (its profiled batch: ~0.95 ms per all-reduce).

`add_to(path)` appends `all_reduce_in_step` entries (the same fields as diagnose's, plus
`gap_us`) to a `gptbench diagnose --comm` file; predict.latency_from then takes them for
the tensor all-reduces. Each iteration: a barrier, then CHAIN rounds of (busy compute for
gap_us, all-reduce); the figure is (wall - compute) / CHAIN, median over iterations, mean
over ranks. The ranks' small skew is inside it, as it is inside a step.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

CHAIN = 8
GAP_US = 200
SIZES = (64, 1024, 16384, 262144, 1 << 20)
OP = "all_reduce_in_step"


def _chain_s(tensor, group, gap_s: float, iterations: int) -> float:
    import torch

    dist = torch.distributed
    a = torch.randn(128, 128)
    per = []
    for i in range(iterations + 2):
        dist.barrier()
        start, busy = time.perf_counter(), 0.0
        for _ in range(CHAIN):
            s = time.perf_counter()
            while time.perf_counter() - s < gap_s:
                a @ a
            busy += time.perf_counter() - s
            dist.all_reduce(tensor, group=group)
        if i >= 2:
            per.append((time.perf_counter() - start - busy) / CHAIN)
    return statistics.median(per)


def _worker(rank: int, world: int, port: int, threads: int, iterations: int, gap_us: int,
            out_path: str) -> None:
    import torch

    torch.set_num_threads(threads)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        entries = []
        for size in sorted({2, world}):
            groups = [list(range(s, s + size)) for s in range(0, world, size)]
            made = [dist.new_group(g) if size < world else None for g in groups]
            mine = next(i for i, g in enumerate(groups) if rank in g)
            for nbytes in SIZES:
                tensor = torch.ones(max(1, nbytes // 4))
                value = _chain_s(tensor, made[mine], gap_us * 1e-6, iterations)
                values = [None] * world
                dist.all_gather_object(values, value)
                entries.append({"op": OP, "group_size": size, "concurrent_groups": len(groups),
                                "bytes": nbytes, "latency_us": 1e6 * sum(values) / world,
                                "iterations": iterations, "world_size": world,
                                "gap_us": gap_us, "threads_per_rank": threads})
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(entries, f)
    finally:
        dist.destroy_process_group()


def measure(world_sizes=(2, 4), threads: int = 1, iterations: int = 15,
            gap_us: int = GAP_US) -> list[dict]:
    import torch.multiprocessing as mp

    from gptbench.worker import _free_port

    out = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "entries.json")
            mp.spawn(_worker, args=(world, _free_port(), threads, iterations, gap_us, path),
                     nprocs=world, join=True)
            with open(path, encoding="utf-8") as f:
                out += json.load(f)
    return out


def add_to(path: str, world_sizes=(2, 4), threads: int = 1) -> None:
    """Append this machine's in-step all-reduce entries to a diagnose --comm file."""
    from gptbench import results

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["entries"] = [e for e in data["entries"] if e["op"] != OP] + measure(world_sizes,
                                                                               threads)
    results.write_json_atomic(path, data)


def in_step_entries(entries: list[dict]) -> list[dict]:
    """Entries for the tensor all-reduces of a step: the in-step ones, named all_reduce,
    where the file has them; else the file's all_reduce entries."""
    step = [{**e, "op": "all_reduce"} for e in entries if e["op"] == OP]
    if not step:
        return entries
    return [e for e in entries if e["op"] not in ("all_reduce", OP)] + step
