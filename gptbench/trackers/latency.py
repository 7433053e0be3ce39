"""Latency of the collectives a decode step makes, measured on real process groups.

Used by `gptbench diagnose --comm` (a standalone probe, written as JSON for `gptbench plan
--comm-file`) and inside every run after its profiled batch (on the run's own groups, with
its ranks and threads). Every iteration starts after a barrier of all ranks, and all groups
of a kind run at once, as they do in a tp x dp or pp x dp run. The latency is taken the
way the time breakdown splits a call (trackers/breakdown.py): from the moment the last
participant issued the operation to the moment this rank got out of it, so the skew of
the ranks leaving the barrier (waiting, not communication) is left out. On CUDA it is the
group's shortest NCCL kernel (Work.get_duration, TORCH_NCCL_ENABLE_TIMING), which leaves
out our own launch and sync as well; the host clock where kernel times are missing.

Entries: {"op": all_reduce|p2p|p2p_ready|barrier|broadcast, "group_size",
"concurrent_groups", "bytes", "latency_us" (median over iterations, mean over ranks),
"iterations"}. A p2p entry is one way, on the receiver: from the later of the two issues to
the receive's return; `p2p` with both issued at once (a stage waiting for its input),
`p2p_ready` with the receive issued after the send (the input already waiting).
"""
from __future__ import annotations

import math
import socket
import statistics
import time

import torch

from gptbench.trackers.timing import synchronize

DEFAULT_ITERATIONS = 20
WARMUP = 3
READY_DELAY_S = 0.002  # a `p2p_ready` probe's receive comes this long after the send


def _tensor(nbytes: int, device, dtype=torch.float32) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.ones(max(1, nbytes // itemsize), dtype=dtype, device=device)


def _spans(op, device, iterations: int) -> list[tuple]:
    """(issued, returned, kernel_s) of `op` in each iteration after the warm-up. `op`
    returns None, the time it issued its operation (when late), an NCCL Work (CUDA: the
    operation issued non-blocking and waited on), or (issued, Work). kernel_s: the Work's
    NCCL kernel time (TORCH_NCCL_ENABLE_TIMING), read after the last iteration; None
    without one (CPU, gloo, timing off)."""
    dist = torch.distributed
    out, works = [], []
    for i in range(WARMUP + iterations):
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        issued = op()
        issued, work = issued if isinstance(issued, tuple) else (issued, None)
        if hasattr(issued, "get_duration"):
            issued, work = None, issued
        synchronize(device)
        if i >= WARMUP:
            out.append((issued if isinstance(issued, float) else start, time.perf_counter()))
            works.append(work)
    synchronize(device)
    return [(*span, kernel_seconds(work)) for span, work in zip(out, works)]


def kernel_seconds(work) -> float | None:
    """An NCCL Work's kernel time in seconds, or None where it has none."""
    if work is None:
        return None
    try:
        return work.get_duration() / 1e3  # milliseconds
    except (RuntimeError, AttributeError):
        return None


def after_last_arrival_s(everyone: list[dict], participants: list[int], me: int) -> float:
    """Median over iterations of this rank's latency: with kernel times for every
    participant (CUDA), the group's shortest kernel (the last to arrive spins least: its
    kernel is the transfer, without our launch and sync); otherwise this rank's return
    less the last participant's issue on the host clock (aligned at the barrier)."""
    one_host = len({e["host"] for e in everyone}) == 1
    ref = everyone[me]["ref"]
    offset = {r: 0.0 if one_host else e["ref"] - ref for r, e in enumerate(everyone)}
    out = []
    for i, span in enumerate(everyone[me]["spans"]):
        kernels = [(everyone[r]["spans"][i] + (None,))[2] for r in participants]
        if all(k is not None for k in kernels):
            out.append(min(kernels))
            continue
        last = max(everyone[r]["spans"][i][0] - offset[r] for r in participants)
        out.append(max(0.0, span[1] - last))
    return statistics.median(out)


def _after_last_arrival(spans, participants, report: bool = True) -> float | None:
    """`after_last_arrival_s` of this rank, or None where `report` is false. Every rank of
    the world calls this with its own spans (it gathers everyone's)."""
    dist = torch.distributed
    dist.barrier()
    mine = {"host": socket.gethostname(), "ref": time.perf_counter(), "spans": spans}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if not (report and spans and participants):
        return None
    return after_last_arrival_s(everyone, participants, dist.get_rank())


def probe_group_op(op: str, groups: list[list[int]], nbytes: int, device,
                   iterations: int = DEFAULT_ITERATIONS, made: dict | None = None) -> float | None:
    """Median seconds of `op` on this rank's group among `groups` (all run at once), after
    its last member issued it; None on a rank in none of them. Every rank must call this
    (it barriers the world). `made` caches process groups by their ranks (new_group is
    collective: every rank creates every group, in the same order)."""
    dist = torch.distributed
    made = {} if made is None else made
    mine = None
    for ranks in groups:
        key = tuple(ranks)
        if key not in made:
            made[key] = dist.new_group(list(ranks)) if len(ranks) < dist.get_world_size() else None
        if dist.get_rank() in ranks:
            mine = key
    tensor = _tensor(nbytes, device)
    if mine is None:
        _spans(lambda: None, device, iterations)  # keep the world's barriers in step
        return _after_last_arrival([], [], report=False)
    group = made[mine]
    on_device = device.type == "cuda"  # NCCL: the Work's kernel time, not our syncs

    def waited(work):
        if work is not None:
            work.wait()
        return work

    calls = {
        "all_reduce": lambda: waited(dist.all_reduce(tensor, group=group, async_op=on_device)),
        "broadcast": lambda: waited(dist.broadcast(tensor, src=mine[-1], group=group,
                                                   async_op=on_device)),
        "barrier": lambda: waited(dist.barrier(group=group, async_op=on_device)),
    }
    return _after_last_arrival(_spans(calls[op], device, iterations), list(mine))


def probe_p2p(pairs: list[tuple[int, int]], nbytes: int, device,
              iterations: int = DEFAULT_ITERATIONS, ready: bool = False) -> float | None:
    """One way, on the receiving rank of its pair among `pairs` (all at once): median
    seconds from the later of the send's and the receive's issue to the receive's return;
    None on other ranks. `ready`: the receive comes READY_DELAY_S after the send, as in a
    pipeline whose busiest stage finds its input waiting; gloo then needs a round trip
    (the receive's notice to the sender, the data back) with both processes waking up."""
    dist = torch.distributed
    me = dist.get_rank()
    tensor = _tensor(nbytes, device)
    role = next(((a, b) for a, b in pairs if me in (a, b)), None)

    def one_way():
        a, b = role
        if device.type == "cuda":  # NCCL: the Work's kernel time, not our syncs
            work = dist.isend(tensor, b) if me == a else dist.irecv(tensor, a)
            work.wait()
            return work
        if me == a:
            dist.send(tensor, b)
        else:
            dist.recv(tensor, a)

    def late_receive():
        if me != role[1]:
            return one_way()
        time.sleep(READY_DELAY_S)
        issued = time.perf_counter()
        return issued, one_way()

    spans = _spans(late_receive if role and ready else one_way if role else (lambda: None),
                   device, iterations)
    receiving = role is not None and me == role[1]
    return _after_last_arrival(spans, list(role) if role else [], report=receiving)


def entry(op: str, group_size: int, concurrent: int, nbytes: int, values: list,
          iterations: int) -> dict | None:
    """One table entry from the ranks' values (None where a rank did not measure)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"op": op, "group_size": group_size, "concurrent_groups": concurrent,
            "bytes": nbytes, "latency_us": 1e6 * sum(values) / len(values),
            "iterations": iterations}


class LatencyTable:
    """Latency of an operation by group size and message size, from measured entries
    (log-log interpolation between sizes; the nearest group size), or one fixed value."""

    def __init__(self, entries: list[dict] | None = None, fixed_us: float | None = None,
                 source: str = ""):
        self.entries = [e for e in (entries or []) if e]
        self.fixed_us = fixed_us
        self.source = source

    def lookup_us(self, op: str, group_size: int, nbytes: int,
                  world_size: int | None = None) -> float | None:
        """Measured at `world_size` ranks where the table has it (concurrent groups share
        the machine), else at the nearest world size."""
        if self.fixed_us is not None:
            return self.fixed_us
        candidates = [e for e in self.entries if e["op"] == op]
        if op == "broadcast" and not candidates:  # same pattern of one round as all-reduce
            candidates = [e for e in self.entries if e["op"] == "all_reduce"]
        if not candidates:
            return None
        worlds = {e.get("world_size") for e in candidates}
        if world_size is not None and None not in worlds:
            nearest = min(worlds, key=lambda w: (abs(w - world_size), -w))
            candidates = [e for e in candidates if e["world_size"] == nearest]
        size = min({e["group_size"] for e in candidates}, key=lambda g: (abs(g - group_size), -g))
        points = sorted((e["bytes"], e["latency_us"]) for e in candidates
                        if e["group_size"] == size)
        return _interpolate(points, nbytes)


def _interpolate(points: list[tuple[int, float]], nbytes: int) -> float:
    """Log-log between the two measured sizes around `nbytes`; flat beyond the ends
    below, proportional to size beyond the largest (bandwidth-bound)."""
    x = max(nbytes, 1)
    if x <= max(points[0][0], 1):
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1] * x / max(points[-1][0], 1)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            x0, x1 = max(x0, 1), max(x1, 1)
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return points[-1][1]
