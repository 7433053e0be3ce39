"""`gptbench plan`: per-rank memory, bandwidth bounds and predicted TPOT of every strategy,
before any run.

Which grids exist, the micro-batch default and the divisibility rules come from the code
`gptbench run` uses (topology.applicable_grids, topology.micro_batches), so plan lists
exactly what run accepts. What each rank holds, reads and sends comes from
gptbench/sharding.py (the mechanisms measured in docs/deepspeed-notes.md); the step-time
model (flush and in-flight pipeline schedules) from roofline.token_time_s. The bound reads bytes at the card's peak bandwidth; with
`--comm-latency-us` or `--comm-file` (from `gptbench diagnose --comm`) every collective of
a decode step is added at its latency (`predict_tpot`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from gptbench import limits, sharding
from gptbench.errors import NotApplicable, UserError
from gptbench.roofline import (
    DEVICES,
    GiB,
    ModelDims,
    custom_device,
    dtype_bytes,
    gpt2_params,
    layout_bound_s,
    match_device,
    predict_tpot,
)
from gptbench.topology import applicable_grids, check_schedule, micro_batches

GPT2_VOCAB_SIZE = 50257  # transformers.GPT2Config defaults, shared by all hub GPT-2 sizes
GPT2_N_POSITIONS = 1024
DTYPES = ("float16", "bfloat16", "float32")  # workload.dtype's, less "auto"
SCHEDULES = ("flush", "in_flight")


def model_dims(name_or_preset: str, tied_embeddings: bool = True) -> ModelDims:
    """Sizes of a preset ("tiny") or hub architecture ("gpt2-xl")."""
    from gptbench.modelspec import ARCHITECTURES, PRESETS

    if name_or_preset in PRESETS:
        p = PRESETS[name_or_preset]
        sizes = {k: p[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")}
    elif name_or_preset in ARCHITECTURES:
        sizes = dict(ARCHITECTURES[name_or_preset], vocab_size=GPT2_VOCAB_SIZE,
                     n_positions=GPT2_N_POSITIONS)
    else:
        known = ", ".join([*ARCHITECTURES, *PRESETS])
        raise UserError(f"model '{name_or_preset}' is not known to plan (known: {known})")
    return ModelDims(**sizes, params=gpt2_params(**sizes, tied_embeddings=tied_embeddings),
                     tied_embeddings=tied_embeddings)


@dataclass(frozen=True)
class PlanRow:
    model: str
    device: str
    gpus: int
    dtype: str
    batch_size: int  # per data-parallel replica
    input_len: int
    output_len: int
    strategy: str
    dp: int
    tp: int
    pp: int
    micro_batches: int | None
    schedule: str                    # flush | in_flight (pipelines), none
    status: str                      # "ok" | "refused" (what `gptbench run` would refuse)
    reason: str | None = None        # why refused
    weight_bytes_per_rank: int | None = None    # the fullest rank
    kv_cache_bytes_per_rank: int | None = None  # its m caches at input_len + output_len
    total_bytes_per_rank: int | None = None
    device_memory_bytes: int | None = None
    headroom_bytes: int | None = None
    verdict: str | None = None               # "fits" | "does not fit"
    max_batch_size: int | None = None        # largest batch per replica that fits
    host_bytes_per_rank: int | None = None   # while loading (CPU run; GPU + checkpoint)
    bytes_per_decode_step: float | None = None  # slowest rank, mean decode context
    tpot_ms_bound: float | None = None       # bytes / peak bandwidth, no communication
    tokens_per_s_bound: float | None = None  # all replicas together
    speedup_bound: float | None = None       # over the same batch on one GPU
    tpot_ms_predicted: float | None = None   # bound + collectives x latency
    comm_ms_per_token: float | None = None
    collectives_per_step: int | None = None
    notes: tuple[str, ...] = ()


def _max_batch(lay: sharding.Layout, memory_bytes: int, requested_m: int | None) -> int:
    """Largest batch per replica whose fullest rank holds weights + KV within memory, and
    that `topology.micro_batches` accepts."""
    best = None
    for s in lay.ranks:
        per_sequence = s.kv_elements_per_token * (lay.input_len + lay.output_len) * lay.dtype_bytes
        room = memory_bytes - lay.weight_bytes(s)
        fits = math.floor(room / per_sequence) if per_sequence else 10 ** 9
        best = fits if best is None else min(best, fits)
    best = max(0, best)
    if lay.pp > 1:  # the default m is pp (or the batch when smaller): the batch divides by it
        m = requested_m or lay.pp
        best = best - best % m if best >= m else (best if requested_m is None else 0)
        if lay.schedule == "in_flight" and best < lay.pp:
            best = 0  # in flight needs m >= pp micro-batches, so a batch >= pp
    return best


def _notes(lay: sharding.Layout) -> tuple[str, ...]:
    model, notes = lay.model, []
    if lay.tp > 1:
        heads = "/".join(map(str, sharding.heads_per_rank(model.n_head, lay.tp)))
        notes.append(f"tp: heads {heads}; embeddings replicated (a step gathers "
                     f"{lay.batch_size} rows), lm_head split by input features; "
                     f"{2 * model.n_layer + 1} all-reduces per micro-batch per step")
    if lay.pp > 1:
        layers = ", ".join(f"[{st[0].layers[0]},{st[0].layers[1]})" for st in lay.shares)
        notes.append(f"pp: stages hold layers {layers} of embed+{model.n_layer} blocks+head; "
                     f"{lay.micro_batches} KV caches of {lay.batch_size // lay.micro_batches} "
                     f"sequences per stage; each stage re-reads its weights for every "
                     f"micro-batch")
    return tuple(notes)


def _row(device, grid, lay, latency, latency_source, requested_m) -> dict:
    mem = lay.memory()
    fullest = max(range(len(mem["per_rank"])), key=mem["per_rank"].__getitem__)
    total = mem["per_rank"][fullest]
    bound_s = layout_bound_s(device, lay)
    fields = dict(
        weight_bytes_per_rank=mem["weights"][fullest], kv_cache_bytes_per_rank=mem["kv"][fullest],
        total_bytes_per_rank=total, device_memory_bytes=device.memory_bytes,
        headroom_bytes=device.memory_bytes - total,
        verdict="fits" if total <= device.memory_bytes else "does not fit",
        max_batch_size=_max_batch(lay, device.memory_bytes, requested_m),
        host_bytes_per_rank=max(sharding.host_memory_bytes(lay, "cpu")),
        bytes_per_decode_step=lay.decode_step_bytes(lay.slowest()),
        tpot_ms_bound=bound_s * 1e3,
        tokens_per_s_bound=grid.dp * lay.batch_size / bound_s,
        collectives_per_step=sum(c.per_step for c in lay.collectives()),
        notes=_notes(lay))
    if latency is not None:
        compute_s = [b / device.memory_bandwidth_bytes_per_s for b in lay.stage_step_bytes()]
        predicted = predict_tpot(lay, compute_s, latency, "bandwidth bound", latency_source)
        fields.update(tpot_ms_predicted=predicted["tpot_ms"],
                      comm_ms_per_token=predicted["comm_ms_per_token"])
    return fields


def latency_table(comm_latency_us: float | None = None, comm_file: str | None = None):
    """(lookup, source) from a fixed latency or a `gptbench diagnose --comm` file."""
    from gptbench.trackers.latency import LatencyTable

    if comm_latency_us is not None and comm_file is not None:
        raise UserError("give --comm-latency-us or --comm-file, not both")
    if comm_latency_us is not None:
        if comm_latency_us < 0:
            raise UserError(f"--comm-latency-us: must be >= 0, got {comm_latency_us}")
        return LatencyTable(fixed_us=comm_latency_us).lookup_us, f"{comm_latency_us:g} µs per collective"
    if comm_file is None:
        return None, None
    try:
        with open(comm_file, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["entries"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"--comm-file {comm_file}: not a `gptbench diagnose --comm` file "
                        f"({type(e).__name__}: {(str(e) or '-').splitlines()[0][:160]})") from None
    source = f"{comm_file} ({data.get('backend')}, measured {data.get('measured_at')})"
    return LatencyTable(entries).lookup_us, source


def plan(model_name_or_preset: str, gpus: int, gpu: str | None = "rtx3080",
         batch_size: int = 4, input_len: int = 256, output_len: int = 64,
         dtype: str = "float16", micro_batches: int | None = None,
         partition_method: str = "parameters", gpu_memory_gib: float | None = None,
         gpu_bandwidth_gbps: float | None = None, comm_latency_us: float | None = None,
         comm_file: str | None = None, tied_embeddings: bool = True) -> list[PlanRow]:
    """One PlanRow per grid `gptbench run` accepts on `gpus` cards (pipelines: one per
    schedule), refused ones with their reason."""
    check_numbers(gpus, batch_size, input_len, output_len, micro_batches, gpu_memory_gib,
                  gpu_bandwidth_gbps, comm_latency_us)
    device = _device(gpu, gpu_memory_gib, gpu_bandwidth_gbps)
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)} (workload.dtype)")
    for key, value in (("batch_size", batch_size), ("input_len", input_len),
                       ("output_len", output_len)):
        if value < 1:
            raise UserError(f"workload.{key}: must be positive, got {value}")
    if micro_batches is not None and micro_batches < 1:
        raise UserError(f"topology.micro_batches: must be positive, got {micro_batches}")
    model = model_dims(model_name_or_preset, tied_embeddings)
    if input_len + output_len > model.n_positions:
        raise UserError(f"input_len + output_len = {input_len + output_len} exceeds the "
                        f"{model.n_positions} positions of {model_name_or_preset}")
    nbytes = dtype_bytes(dtype)
    latency, latency_source = latency_table(comm_latency_us, comm_file)
    sharding.stage_bounds(model, 1, 1, partition_method)  # a bad method is bad input
    context = dict(model=model_name_or_preset, device=device.key, gpus=gpus, dtype=dtype,
                   batch_size=batch_size, input_len=input_len, output_len=output_len)
    one = sharding.layout(model, 1, 1, 1, 1, batch_size, input_len, output_len, nbytes)
    one_gpu_tokens_per_s = batch_size / layout_bound_s(device, one)
    rows = []
    for strategy, grid in applicable_grids(gpus, model.n_head, model.n_layer):
        base = dict(context, strategy=strategy, dp=grid.dp, tp=grid.tp, pp=grid.pp)
        for schedule in (SCHEDULES if grid.pp > 1 else ("none",)):
            try:
                m = micro_batches_for(grid, batch_size, micro_batches, schedule)
                lay = sharding.layout(model, grid.dp, grid.tp, grid.pp, m, batch_size,
                                      input_len, output_len, nbytes, schedule, partition_method)
            except (UserError, NotApplicable) as e:
                rows.append(PlanRow(**base, micro_batches=None, schedule=schedule,
                                    status="refused", reason=str(e)))
                continue
            fields = _row(device, grid, lay, latency, latency_source, micro_batches)
            rows.append(PlanRow(**base, micro_batches=m, schedule=schedule, status="ok",
                                speedup_bound=fields["tokens_per_s_bound"] / one_gpu_tokens_per_s,
                                **fields))
    return rows


def check_numbers(gpus, batch_size, input_len, output_len, micro_batches, memory_gib,
                  bandwidth_gbps, latency_us) -> None:
    """Each flag within what it can mean (limits.py): finite, positive, and counts that a
    machine or a cluster has; argparse's float() reads 'inf' and 'nan' as numbers."""
    limits.check_int("--gpus", gpus, 1, limits.MAX_WORLD)
    limits.check_int("--batch-size", batch_size, 1, limits.MAX_BATCH)
    for key, value in (("--input-len", input_len), ("--output-len", output_len)):
        limits.check_int(key, value, 1, limits.MAX_LEN)
    if micro_batches is not None:
        limits.check_int("--micro-batches", micro_batches, 1, limits.MAX_BATCH)
    if memory_gib is not None:
        limits.check_float("--gpu-memory-gib", memory_gib, 0, 1e6, low_open=True)
    if bandwidth_gbps is not None:
        limits.check_float("--gpu-bandwidth-gbps", bandwidth_gbps, 0, 1e6, low_open=True)
    if latency_us is not None:
        limits.check_float("--comm-latency-us", latency_us, 0, 1e9)


def micro_batches_for(grid, batch_size: int, requested: int | None, schedule: str) -> int:
    """`gptbench run`'s rule (topology.micro_batches), then the schedule's (m >= pp)."""
    m = micro_batches(grid, batch_size, requested)
    check_schedule(schedule, grid, m)
    return m


def _device(gpu: str | None, memory_gib: float | None, bandwidth_gbps: float | None):
    known = match_device(gpu) if gpu else None
    if known is None and (memory_gib is None or bandwidth_gbps is None):
        what = f"unknown GPU '{gpu}'" if gpu else "no --gpu"
        raise UserError(f"{what} (known: {', '.join(DEVICES)}); for another card give "
                        "--gpu-memory-gib and --gpu-bandwidth-gbps")
    if memory_gib is None and bandwidth_gbps is None:
        return known
    return custom_device(memory_gib, bandwidth_gbps, name=gpu or "custom GPU", base=known)


def _size(nbytes: float) -> str:
    """Binary units, like nvidia-smi and torch.cuda; small models get MiB or KiB."""
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _verdict(r: PlanRow) -> str:
    if r.verdict == "fits":
        return f"fits ({_size(r.headroom_bytes)} free)"
    if r.max_batch_size:
        return f"does not fit: batch <= {r.max_batch_size} fits"
    return "does not fit at any batch"


def format_plan(rows: list[PlanRow], device=None) -> str:
    """A plain-text table of `rows` (all from one `plan` call), then the notes."""
    if not rows:
        return "no strategy can be formed\n"
    r0 = rows[0]
    device = device or DEVICES.get(r0.device)
    card = (f"{device.name} ({_size(device.memory_bytes)}, "
            f"{device.memory_bandwidth_bytes_per_s / 1e9:g} GB/s)") if device else r0.device
    lines = [f"{r0.model} {r0.dtype} on {r0.gpus} x {card}; batch {r0.batch_size} per "
             f"replica, {r0.input_len} -> {r0.output_len} tokens", ""]
    predicted = any(r.tpot_ms_predicted is not None for r in rows)
    header = ["strategy", "dp x tp x pp", "m", "schedule", "weights", "KV cache", "total",
              "verdict", "host/rank", "TPOT >= ms", "tok/s <=", "x 1 GPU"]
    if predicted:
        header += ["TPOT pred ms", "tok/s pred"]
    table = [header]
    for r in rows:
        if r.status != "ok":
            continue
        cells = [r.strategy, f"{r.dp} x {r.tp} x {r.pp}", str(r.micro_batches), r.schedule,
                 _size(r.weight_bytes_per_rank), _size(r.kv_cache_bytes_per_rank),
                 _size(r.total_bytes_per_rank), _verdict(r), _size(r.host_bytes_per_rank),
                 f"{r.tpot_ms_bound:.3g}", f"{r.tokens_per_s_bound:,.0f}",
                 f"{r.speedup_bound:.2f}"]
        if predicted:
            cells += [f"{r.tpot_ms_predicted:.3g}",
                      f"{r.dp * r.batch_size / r.tpot_ms_predicted * 1e3:,.0f}"]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append("")
    seen = set()
    for r in rows:
        for note in r.notes:
            if (r.strategy, note) not in seen:
                seen.add((r.strategy, note))
                lines.append(f"{r.strategy} {r.dp}x{r.tp}x{r.pp}: {note}")
        if r.status != "ok":
            lines.append(f"not possible: {r.strategy} {r.dp}x{r.tp}x{r.pp} {r.schedule}: {r.reason}")
    lines.append("Per rank: the fullest rank. host/rank: host memory a rank needs while the "
                 "model loads (CPU runs; GPU runs reading a checkpoint): the whole model in "
                 "the run's dtype plus its new shard; ranks on one host add up.")
    lines.append("Bounds: bytes read per decode step / peak bandwidth. " + (
        "TPOT pred adds every collective of a step at the given latency." if predicted else
        "Communication not modelled: add --comm-latency-us X or --comm-file FILE "
        "(gptbench diagnose --comm)."))
    lines.append("Headroom must also hold the CUDA context (~0.3-0.5 GiB) and activations.")
    return "\n".join(lines) + "\n"


def add_arguments(p) -> None:
    """`gptbench plan`'s options (cli.py builds the parser)."""
    p.add_argument("--model", default="gpt2-xl")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu", default="rtx3080",
                   help=f"a torch.cuda.get_device_name() string or one of {', '.join(DEVICES)}")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of a card plan does not list")
    p.add_argument("--gpu-bandwidth-gbps", type=float,
                   help="peak memory bandwidth (GB/s) of a card plan does not list")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="float16", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--micro-batches", type=int, help="topology.micro_batches (default pp)")
    p.add_argument("--partition-method", default="parameters", help="parameters or uniform")
    p.add_argument("--comm-latency-us", type=float, help="latency of every collective")
    p.add_argument("--comm-file", help="latencies measured by gptbench diagnose --comm")


def main(a) -> int:
    check_numbers(a.gpus, a.batch_size, a.input_len, a.output_len, a.micro_batches,
                  a.gpu_memory_gib, a.gpu_bandwidth_gbps, a.comm_latency_us)
    rows = plan(a.model, a.gpus, a.gpu, a.batch_size, a.input_len, a.output_len, a.dtype,
                a.micro_batches, a.partition_method, a.gpu_memory_gib, a.gpu_bandwidth_gbps,
                a.comm_latency_us, a.comm_file)
    device = _device(a.gpu, a.gpu_memory_gib, a.gpu_bandwidth_gbps)
    print(format_plan(rows, device), end="")
    return 0
