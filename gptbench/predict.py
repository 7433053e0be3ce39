"""The one prediction of a run's timings, for real runs (`metrics.predicted`, from the run's
own measured compute) and emulated ones (`gptbench emulate`, from each rank role's compute
timed under a fake process group): per-stage compute of the slowest shard pushed through the
schedule, plus every collective of the step (sharding.Layout.collectives) at a latency from
`gptbench diagnose --comm` (`--comm-file`), a named interconnect (gptbench/interconnect.py)
or the run's own probes.

TPOT is roofline.predict_tpot (its docstring has the schedule's arithmetic). The prefill is
the same composition at input_len tokens per sequence: flush (and pp=1) puts out every
first token at once, after sum(ticks) + (m-1) max(ticks) (the flow shop of m micro-batches);
in flight, micro-batch k's first token comes after sum(ticks) + k max(ticks), so the
record's TTFT (over the micro-batches' first tokens) is their mean. A sequence ends
output_len - 1 tokens after the last first token: e2e = ttft_last + (N-1) x TPOT, and
tokens/s = dp x batch x N / e2e (the per-batch barrier left out).
"""
from __future__ import annotations

from typing import Callable, Sequence

from gptbench import roofline as rl
from gptbench.errors import UserError
from gptbench.sharding import Layout

LatencyUs = Callable[[str, int, int], "float | None"]


def latency_from(comm_file: str | None = None, interconnect: str | None = None):
    """(lookup_us or None, source) for `--comm-file` or `--interconnect` (one of them)."""
    if comm_file and interconnect:
        raise UserError("give --comm-file or --interconnect, not both")
    if comm_file:
        from gptbench.plan import latency_table

        lookup, source = latency_table(None, comm_file)  # checks the file: bad input exit 2
        import json

        from gptbench import stepcomm
        from gptbench.trackers.latency import LatencyTable

        with open(comm_file, encoding="utf-8") as f:
            entries = json.load(f)["entries"]
        if any(e["op"] == stepcomm.OP for e in entries):
            lookup = LatencyTable(stepcomm.in_step_entries(entries)).lookup_us
            source += ("; tensor all-reduces at the file's all_reduce_in_step entries (after "
                       "compute, as a step makes them: gptbench/stepcomm.py)")
        return lookup, source  # LatencyTable.lookup_us: takes world_size= too
    if interconnect:
        from gptbench.interconnect import profile

        link = profile(interconnect)
        return (lambda op, size, nbytes, world_size=None: link.lookup_us(op, size, nbytes),
                f"interconnect profile '{link.key}' ({link.name}): {link.source}")
    return None, "none given (--comm-file or --interconnect): collectives counted as 0"


def at_world(latency_us: LatencyUs | None, world_size: int) -> LatencyUs | None:
    """`latency_from`'s lookup at the run's world size (a --comm-file holds each world
    size's own entries: concurrent groups share the machine)."""
    if latency_us is None:
        return None
    return lambda op, size, nbytes: latency_us(op, size, nbytes, world_size=world_size)


def _seconds(latency_us: LatencyUs | None, op: str, size: int, nbytes: int) -> float:
    value = latency_us(op, size, nbytes) if latency_us else None
    return (value or 0.0) * 1e-6


def prefill_s(lay: Layout, stage_prefill_s: Sequence[float],
              latency_us: LatencyUs | None) -> tuple[float, float]:
    """(mean, last) seconds to the first tokens of the replica's batch. `stage_prefill_s`:
    per stage, its slowest rank's compute for the whole batch's prefill (m micro-batches)."""
    m = lay.micro_batches
    colls = lay.collectives(tokens=lay.input_len)
    tick = [s / m for s in stage_prefill_s]
    for c in colls:
        if c.where == "tick":
            tick[c.stage] += c.per_step / m * _seconds(latency_us, c.op, c.group_size, c.nbytes)
    hops = max(1, (lay.pp - 1) * m)
    hop = sum(c.per_step / hops * _seconds(latency_us, c.op, c.group_size, c.nbytes)
              for c in colls if c.where == "hop")
    step = sum(c.per_step * _seconds(latency_us, c.op, c.group_size, c.nbytes)
               for c in colls if c.where == "step")
    if lay.pp == 1:
        return m * tick[0] + step, m * tick[0] + step
    busy = [t + (hop if s > 0 else 0.0) for s, t in enumerate(tick)]
    last = sum(busy) + (m - 1) * max(busy) + step
    if lay.schedule == "in_flight":
        return sum(busy) + (m - 1) / 2 * max(busy), last
    return last, last


def predict(lay: Layout, stage_prefill_s: Sequence[float] | None,
            stage_decode_s: Sequence[float], latency_us: LatencyUs | None,
            compute_source: str, latency_source: str) -> dict:
    """The prediction block: roofline.predict_tpot's TPOT and inputs, plus ttft_ms,
    ttft_last_ms, e2e_ms and tokens_per_s (None without a prefill compute)."""
    out = rl.predict_tpot(lay, stage_decode_s, latency_us, compute_source, latency_source)
    out.update(ttft_ms=None, ttft_last_ms=None, e2e_ms=None, tokens_per_s=None,
               prefill_compute_ms=None)
    if stage_prefill_s is None:
        return out
    mean_s, last_s = prefill_s(lay, stage_prefill_s, latency_us)
    e2e_s = last_s + (lay.output_len - 1) * out["tpot_ms"] / 1e3
    out.update(ttft_ms=mean_s * 1e3, ttft_last_ms=last_s * 1e3, e2e_ms=e2e_s * 1e3,
               tokens_per_s=lay.dp * lay.batch_size * lay.output_len / e2e_s if e2e_s else None,
               prefill_compute_ms=[s * 1e3 for s in stage_prefill_s])
    return out
