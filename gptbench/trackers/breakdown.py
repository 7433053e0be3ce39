"""Where each rank's time went on the profiled batch: compute, communication, waiting.

Input: every rank's log of torch.distributed calls (trackers/comm.py, one `Call` per
call, with when it was issued and when the rank was blocked in it) and the profiled
batch's span. Calls are matched across ranks: the k-th call on a group is the same
collective on all its members; the k-th send a->b is the k-th receive on b from a. For
each call a rank was blocked in:
- ready = when the last participant issued it (the peer arrived);
- waiting = the part of the blocked span before `ready` (blocked on a peer: an idle
  pipeline stage waiting for its input, a tensor rank waiting for a slower one);
- communication = the rest (the transfer itself once everyone is there). It is an upper
  bound: it includes the library's own overhead and, where ranks share too few cores,
  time a rank waits to be scheduled;
- compute = the batch's wall time minus both (the model's kernels, the framework and
  Python between them). The three fractions add up to 1 by construction.
Ranks on one host share one monotonic clock; across hosts the clocks are aligned by the
barrier before the profiled batch (accurate to that barrier's exit skew). A call whose
peers' records are missing counts as communication whole (an upper bound) and is counted
in `unmatched_calls`.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict

PHASES = ("prefill", "decode")


def _key(call: list) -> tuple | None:
    kind, group = call[1], tuple(call[2])
    if kind == "collective":
        return ("collective", group)
    if None in group:
        return None
    return ("p2p", *group)


def _index(logs: dict[int, list]) -> dict[int, dict[tuple, list[int]]]:
    """rank -> key -> positions of that key's calls in the rank's log, in order."""
    out = {}
    for rank, calls in logs.items():
        by_key = defaultdict(list)
        for i, call in enumerate(calls):
            key = _key(call)
            if key is not None:
                by_key[key].append(i)
        out[rank] = by_key
    return out


def _participants(key: tuple, rank: int) -> list[int]:
    if key[0] == "collective":
        return list(key[1])
    return [key[1], key[2]]


def _device_s(call: list) -> float | None:
    """The call's NCCL kernel time (trackers/comm.py's device path), or None."""
    return call[7] if len(call) > 7 else None


def _shortest_kernel(call, key, k: int, rank: int, logs, index) -> float | None:
    """The shortest kernel time among the participants of the k-th call on `key`: the
    last rank to arrive spins least, so its kernel is the transfer itself and what a rank
    spent beyond it was waiting for peers. None where a peer's time is missing."""
    times = [_device_s(call)]
    for peer in _participants(key, rank):
        if peer != rank:
            times.append(_device_s(logs[peer][index[peer][key][k]]))
    return None if any(t is None for t in times) else min(times)


def split_calls(logs: dict[int, list], offsets_s: dict[int, float] | None = None) -> dict:
    """rank -> [(start_s, waiting_s, communication_s, op, post_s)] of every call it was
    blocked in (a non-blocking one at its wait, which may come much later than its post),
    plus `unmatched` counts: {"calls": ..., "unmatched": {rank: n}}.

    A call with an NCCL kernel time (CUDA) is placed at its post and lasts its kernel time;
    its communication is the shortest kernel of its group, the rest waiting."""
    offsets_s = offsets_s or {}
    index = _index(logs)
    out, unmatched = {}, {}
    for rank, calls in logs.items():
        position = defaultdict(int)
        spans, missing = [], 0
        for call in calls:
            key = _key(call)
            k = position[key]
            position[key] += 1
            start, end = call[5], call[6]
            if start is None or end is None:  # never waited on: counted, no time
                post = call[4] - offsets_s.get(rank, 0.0)
                spans.append((post, 0.0, 0.0, call[0], post))
                continue
            start, end = start - offsets_s.get(rank, 0.0), end - offsets_s.get(rank, 0.0)
            blocked = max(0.0, end - start)
            ready, found = call[4] - offsets_s.get(rank, 0.0), True
            if key is None:
                found = False
            else:
                for peer in _participants(key, rank):
                    if peer == rank:
                        continue
                    positions = index.get(peer, {}).get(key, [])
                    if k >= len(positions):
                        found = False
                        break
                    ready = max(ready, logs[peer][positions[k]][4] - offsets_s.get(peer, 0.0))
            waiting = min(blocked, max(0.0, ready - start)) if found else 0.0
            if _device_s(call) is not None:  # NCCL kernel times: split against the group's
                shortest = _shortest_kernel(call, key, k, rank, logs, index) if found else None
                waiting = blocked - shortest if shortest is not None else 0.0
                found = shortest is not None
            missing += not found
            spans.append((start, waiting, blocked - waiting, call[0],
                          call[4] - offsets_s.get(rank, 0.0)))
        out[rank], unmatched[rank] = spans, missing
    return {"calls": out, "unmatched": unmatched}


def clock_offsets(profiles: dict[int, dict]) -> tuple[dict[int, float], str]:
    """Offsets to subtract from each rank's clock, and how they were found."""
    hosts = {p.get("host") for p in profiles.values()}
    if len(hosts) <= 1:
        return {}, "one host: one monotonic clock"
    first = min(profiles)
    return ({r: p["clock_ref_s"] - profiles[first]["clock_ref_s"] for r, p in profiles.items()},
            f"{len(hosts)} hosts: clocks aligned at the barrier before the batch")


def rank_times(profile: dict, spans: list[tuple]) -> dict:
    """Seconds of compute / communication / waiting of one rank: over the prefill, over all
    decode steps, and the median decode step (robust to a descheduled step).

    marks_s: the batch's start, the prefill's end, then the end of each decode step, or
    only the batch's end (one segment of `decode_steps` steps, taken as their mean)."""
    marks = profile["marks_s"]

    def within(t: float, lo: float, hi: float, last: bool) -> bool:
        return lo <= t < hi or (last and t >= hi)

    def part(lo: float, hi: float, last: bool) -> dict:
        inside = [sp for sp in spans if within(sp[0], lo, hi, last)]
        waiting = sum(sp[1] for sp in inside)
        communication = sum(sp[2] for sp in inside)
        wall = max(0.0, hi - lo)
        return {"wall_s": wall, "waiting_s": waiting, "communication_s": communication,
                "compute_s": max(0.0, wall - waiting - communication),  # calls: by post
                "calls": Counter(sp[3] for sp in spans if within(sp[4], lo, hi, last))}

    steps = [part(lo, hi, i == len(marks) - 2)
             for i, (lo, hi) in enumerate(zip(marks, marks[1:]))]
    decode = steps[1:]
    n_steps = profile.get("decode_steps") or len(decode)
    per_segment = n_steps / len(decode) if decode and n_steps else 1
    seconds = [k for k in steps[0] if k.endswith("_s")]
    total = {k: sum(st[k] for st in decode) for k in seconds}
    median = {k: statistics.median(st[k] for st in decode) / per_segment if decode else None
              for k in seconds}
    calls = Counter()
    for st in decode:
        calls.update(st["calls"])
    return {"prefill": steps[0], "decode": total, "decode_step_median": median,
            "decode_step_calls": {op: n / (len(decode) * per_segment)
                                  for op, n in sorted(calls.items())} if decode else None}


def time_breakdown(profiles: dict[int, dict]) -> tuple[dict, list[dict]]:
    """The record's `metrics.time_breakdown` from every rank's profile (rank -> dict with
    marks_s, calls, host, clock_ref_s), and per rank (in rank order) the seconds of each
    phase (`rank_times`). per_rank[i].decode_step_ms: the median decode step's parts;
    decode_step_calls: torch.distributed calls per decode step, by operation; by_op: the
    whole batch's calls and seconds waiting / communicating, by operation."""
    offsets, clock_note = clock_offsets(profiles)
    # Profiles' own times are on each rank's clock; only call matching needs alignment.
    split = split_calls({r: p["calls"] for r, p in profiles.items()}, offsets)
    per_rank, phases = [], []
    for rank in sorted(profiles):
        off = offsets.get(rank, 0.0)
        local = [(s + off, w, c, op, p + off) for s, w, c, op, p in split["calls"][rank]]
        times = rank_times(profiles[rank], local)
        phases.append(times)
        whole = [times["prefill"], times["decode"]]
        wall = sum(t["wall_s"] for t in whole)
        waiting = sum(t["waiting_s"] for t in whole)
        communication = sum(t["communication_s"] for t in whole)
        if wall <= 0:
            per_rank.append({"compute": None, "communication": None, "waiting": None,
                             "decode_step_ms": None, "decode_step_calls": None, "by_op": None})
            continue
        fractions = {"communication": min(1.0, communication / wall),
                     "waiting": min(1.0, waiting / wall)}
        fractions["compute"] = max(0.0, 1.0 - fractions["communication"] - fractions["waiting"])
        by_op: dict = {}
        for sp in local:
            entry = by_op.setdefault(sp[3], {"calls": 0, "communication_s": 0.0, "waiting_s": 0.0})
            entry["calls"] += 1
            entry["waiting_s"] += sp[1]
            entry["communication_s"] += sp[2]
        step = times["decode_step_median"]
        per_rank.append({**{k: fractions[k] for k in ("compute", "communication", "waiting")},
                         "decode_step_ms": None if step["wall_s"] is None else {
                             k: step[f"{k}_s"] * 1e3
                             for k in ("wall", "compute", "communication", "waiting")},
                         "decode_step_calls": times["decode_step_calls"], "by_op": by_op})
    known = [f for f in per_rank if f["compute"] is not None]
    untimed = any(p.get("comm_timing_error") for p in profiles.values())
    mean = {k: (sum(f[k] for f in known) / len(known) if known and not untimed else None)
            for k in ("compute", "communication", "waiting")}  # untimed: no kernel times
    return {
        **mean,
        "per_rank": per_rank,
        "unmatched_calls": sum(split["unmatched"].values()),
        "source": _source(profiles, clock_note),
    }, phases


def _source(profiles: dict[int, dict], clock_note: str) -> str:
    """How the profiled batch's calls were timed (trackers/comm.py), in words."""
    calls = [c for p in profiles.values() for c in p["calls"]]
    if calls and all(_device_s(c) is not None for c in calls):
        return ("one separate profiled batch after the timed iterations, every "
                "torch.distributed call timed by its NCCL kernel (Work.get_duration, "
                "TORCH_NCCL_ENABLE_TIMING=1; no device syncs around calls); communication = "
                "the shortest kernel of the call's group (the last to arrive spins least), "
                "waiting = a rank's kernel time beyond it; compute = the rest of the step; "
                + clock_note)
    errors = {p.get("comm_timing_error") for p in profiles.values()} - {None}
    return ("one separate profiled batch after the timed iterations, every "
            "torch.distributed call timed with device syncs around it; waiting = "
            "blocked before the last peer issued the call; communication = blocked "
            "after it (an upper bound: library overhead and, with more ranks than "
            f"cores, waiting for a core); compute = the rest; {clock_note}"
            + (f"; NCCL kernel times unavailable: {sorted(errors)[0]}" if errors else ""))
