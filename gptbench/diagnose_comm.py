"""`gptbench diagnose --comm`: latency of the collectives a decode step makes, on this
machine's backend (NCCL when there are enough GPUs, else gloo on CPU), as JSON for
`gptbench plan --comm-file`.

For each world size (default 2 and 4 ranks, one thread per rank by default as runs on a
small CPU have) it starts that many processes and measures, with trackers/latency.py
(barrier, then the operation; median of its iterations, mean over ranks):
- all-reduce at the message sizes tensor parallel sends (batch x n_embd and batch x vocab
  elements span 4 B .. 4 MiB; the sizes between are interpolated), on groups of 2 and of
  the world size, every group at once (as in tp x dp);
- p2p one way between rank pairs, every pair at once: issued together (`p2p`, a stage
  waiting for its input) and with the receive issued after the send (`p2p_ready`, the
  input already waiting, as the busiest stage of an in-flight pipeline finds it);
- barrier of the world, and broadcast over groups (a pipeline's per-step operations).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import tempfile

ALL_REDUCE_BYTES = tuple(4 ** k for k in range(1, 12))  # 4 B .. 4 MiB
P2P_BYTES = (8, 1024, 65536, 1 << 20)
BROADCAST_BYTES = (8, 1024)
SCHEMA = "gptbench.comm/1"


def _groups(world: int, size: int) -> list[list[int]]:
    return [list(range(start, start + size)) for start in range(0, world, size)]


def _measure(world: int, device, iterations: int) -> list[dict]:
    import torch

    from gptbench.trackers import latency

    made: dict = {}
    entries = []
    rank = torch.distributed.get_rank()

    def gather(value):
        values = [None] * world
        torch.distributed.all_gather_object(values, value)
        return values

    for size in sorted({2, world}):
        if world % size:
            continue
        groups = _groups(world, size)
        for nbytes in ALL_REDUCE_BYTES:
            value = latency.probe_group_op("all_reduce", groups, nbytes, device, iterations, made)
            entries.append(latency.entry("all_reduce", size, len(groups), nbytes,
                                         gather(value), iterations))
        for nbytes in BROADCAST_BYTES:
            value = latency.probe_group_op("broadcast", groups, nbytes, device, iterations, made)
            entries.append(latency.entry("broadcast", size, len(groups), nbytes,
                                         gather(value), iterations))
    value = latency.probe_group_op("barrier", [list(range(world))], 0, device, iterations, made)
    entries.append(latency.entry("barrier", world, 1, 0, gather(value), iterations))
    pairs = [(a, a + world // 2) for a in range(world // 2)]  # across the two halves
    for op in ("p2p", "p2p_ready"):
        for nbytes in P2P_BYTES:
            value = latency.probe_p2p(pairs, nbytes, device, iterations, ready=op == "p2p_ready")
            entries.append(latency.entry(op, 2, len(pairs), nbytes, gather(value), iterations))
    for e in entries:
        if e:
            e["world_size"] = world
    return [e for e in entries if e] if rank == 0 else []


def _worker(rank: int, world: int, port: int, backend: str, threads: int, iterations: int,
            out_path: str) -> None:
    import torch

    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
        # kernel times for the probes (trackers/latency.py), set before the group exists
        os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        entries = _measure(world, device, iterations)
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(entries, f)
    finally:
        torch.distributed.destroy_process_group()


def measure_comm(world_sizes=(2, 4), threads: int | None = None,
                 iterations: int = 20) -> dict:
    """The comm file's content: one process group per world size, measured in turn."""
    import torch
    import torch.multiprocessing as mp

    from gptbench.errors import UserError
    from gptbench.worker import _free_port as free_port

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    entries, backends = [], set()
    for world in world_sizes:
        if world < 2:
            raise UserError(f"--comm-ranks: each world size must be >= 2, got {world}")
        backend = "nccl" if gpus >= world else "gloo"
        backends.add(backend)
        per_rank = threads or max(1, (os.cpu_count() or 1) // world)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "entries.json")
            mp.spawn(_worker, args=(world, free_port(), backend, per_rank, iterations, path),
                     nprocs=world, join=True)
            with open(path, encoding="utf-8") as f:
                entries += [dict(e, threads_per_rank=per_rank) for e in json.load(f)]
    from gptbench.envinfo import package_version

    return {"schema": SCHEMA, "backend": "+".join(sorted(backends)),
            "device": "cuda" if "nccl" in backends else "cpu",
            "host": socket.gethostname(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "deepspeed": package_version("deepspeed"),
            "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "entries": entries}


def format_comm(data: dict) -> str:
    lines = [f"communication latency ({data['backend']}, {data['host']}, "
             f"{data['measured_at']}): median µs once every peer has arrived"]
    for e in data["entries"]:
        size = f"{e['bytes']} B"
        lines.append(f"  {e['op']:<10} world {e['world_size']}, groups of {e['group_size']} "
                     f"x{e['concurrent_groups']}, {size:>10}: {e['latency_us']:9.1f}")
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    """`gptbench diagnose`'s options (cli.py builds the parser; no torch import here)."""
    p.add_argument("--comm", action="store_true",
                   help="measure collective latencies (gloo on CPU, NCCL on GPUs) for plan")
    p.add_argument("--comm-ranks", default="2,4", help="world sizes to measure, e.g. 2,4")
    p.add_argument("--comm-threads", type=int, help="torch threads per rank (default cores/ranks)")
    p.add_argument("--out", default="reports/diagnose/comm.json",
                   help="where --comm writes its JSON (for gptbench plan --comm-file)")
