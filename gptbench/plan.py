"""`gptbench plan`: per-rank memory and bandwidth bounds of every strategy, before any run.

What each rank holds follows the mechanisms gptbench uses (docs/deepspeed-notes.md):
- data parallel: the whole model per rank.
- tensor parallel (AutoTP): block matrices split by heads (uneven: 25 heads -> 13/12, the
  first ranks hold more) and MLP columns; LayerNorms, row-parallel biases and the
  embeddings replicated; the lm_head sliced into a new tensor, so with tied embeddings a
  rank holds the full wte plus 1/tp of an lm_head.
- pipeline (PipelineModule): contiguous [embedding, blocks..., ln_f + lm_head] split by
  parameter count (DeepSpeed's partition_method="parameters") or layer count ("uniform");
  a tied lm_head on another stage than wte is a second vocab x d tensor.
The bounds are memory-bandwidth bounds (roofline.py); communication is not modelled.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from gptbench.errors import UserError
from gptbench.models import ARCHITECTURES, PRESETS
from gptbench.roofline import (DEVICES, GiB, ModelDims, decode_step_bound_s, dtype_bytes,
                               gpt2_params, kv_bytes_per_token, match_device,
                               mean_decode_context)

GPT2_VOCAB_SIZE = 50257  # transformers.GPT2Config defaults, shared by all hub GPT-2 sizes
GPT2_N_POSITIONS = 1024


def model_dims(name_or_preset: str) -> ModelDims:
    """Sizes of a preset ("tiny") or hub architecture ("gpt2-xl"), tied embeddings."""
    if name_or_preset in PRESETS:
        p = PRESETS[name_or_preset]
        sizes = {k: p[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")}
    elif name_or_preset in ARCHITECTURES:
        sizes = dict(ARCHITECTURES[name_or_preset], vocab_size=GPT2_VOCAB_SIZE,
                     n_positions=GPT2_N_POSITIONS)
    else:
        known = ", ".join([*ARCHITECTURES, *PRESETS])
        raise UserError(f"model '{name_or_preset}' is not known to plan (known: {known})")
    return ModelDims(**sizes, params=gpt2_params(**sizes))


@dataclass(frozen=True)
class StageShare:
    """What the largest tensor-parallel rank of one pipeline stage holds."""
    weight_params: int
    kv_fraction: float  # of the whole model's KV per token: (blocks here / n_layer) * head share
    layers: tuple[int, int]  # [first, last) in [embedding, blocks..., head] numbering


def _block_params_tp(model: ModelDims, tp: int) -> int:
    """One block's parameters on tensor rank 0, which holds the most (shape comments: in x out)."""
    d, head_dim = model.n_embd, model.n_embd // model.n_head
    attn = math.ceil(model.n_head / tp) * head_dim     # width of this rank's heads
    ff = math.ceil(4 * model.n_head / tp) * head_dim    # MLP columns, grain = head_dim
    return (d * 3 * attn + 3 * attn     # c_attn (d, 3*attn), column-parallel
            + attn * d + d              # attn c_proj (attn, d), row-parallel, bias whole
            + d * ff + ff               # c_fc (d, ff)
            + ff * d + d                # mlp c_proj (ff, d), bias whole
            + 4 * d)                    # ln_1, ln_2


def _layer_params(model: ModelDims, tp: int, pp: int) -> list[int]:
    """Per-rank parameters of [embedding, block * n_layer, head], as PipelineModule sees them."""
    d = model.n_embd
    separate_lm_head = not model.tied_embeddings or tp > 1 or pp > 1
    lm_head = math.ceil(model.vocab_size / tp) * d if separate_lm_head else 0
    return ([(model.vocab_size + model.n_positions) * d]
            + [_block_params_tp(model, tp)] * model.n_layer
            + [2 * d + lm_head])


def _split_uniform(n_items: int, parts: int) -> list[int]:
    """Boundaries with the first n_items % parts parts one item longer (DeepSpeed's
    partition_uniform)."""
    sizes = [n_items // parts + (1 if i < n_items % parts else 0) for i in range(parts)]
    return [sum(sizes[:i]) for i in range(parts + 1)]


def _split_balanced(weights: list[int], parts: int) -> list[int]:
    """Contiguous boundaries minimising the heaviest part, the objective of DeepSpeed's
    partition_balanced (ties may break differently)."""
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    @functools.cache
    def best(start: int, k: int) -> tuple[int, tuple[int, ...]]:
        if k == 1:
            return prefix[-1] - prefix[start], (len(weights),)
        options = []
        for end in range(start + 1, len(weights) - k + 2):
            rest, cuts = best(end, k - 1)
            options.append((max(prefix[end] - prefix[start], rest), (end, *cuts)))
        return min(options)

    return [0, *best(0, parts)[1]]


def stage_shares(model: ModelDims, tp: int, pp: int,
                 partition_method: str = "parameters") -> list[StageShare]:
    """One StageShare per pipeline stage (one element when pp == 1)."""
    if partition_method not in ("parameters", "uniform"):
        raise UserError(f"topology.partition_method: '{partition_method}' is not one of "
                        "parameters, uniform")
    layers = _layer_params(model, tp, pp)
    if pp > len(layers):
        raise UserError(f"pp={pp} exceeds the {len(layers)} pipeline layers of the model")
    bounds = (_split_balanced(layers, pp) if partition_method == "parameters"
              else _split_uniform(len(layers), pp))
    head_share = math.ceil(model.n_head / tp) / model.n_head
    shares = []
    for first, last in zip(bounds, bounds[1:]):
        blocks = len(range(max(first, 1), min(last, model.n_layer + 1)))
        shares.append(StageShare(sum(layers[first:last]), blocks / model.n_layer * head_share,
                                 (first, last)))
    return shares


def rank_fractions(model: ModelDims, tp: int, pp: int,
                   partition_method: str = "parameters") -> tuple[float, float]:
    """(weight, KV) shares of the fullest rank, for roofline.roofline_block."""
    fullest = max(stage_shares(model, tp, pp, partition_method), key=lambda s: s.weight_params)
    return fullest.weight_params / model.params, fullest.kv_fraction


def grids(gpus: int, n_head: int) -> list[tuple[str, int, int, int]]:
    """(strategy, dp, tp, pp) of every strategy that can be formed on `gpus` ranks."""
    if gpus < 1:
        raise UserError(f"gpus must be >= 1, got {gpus}")
    out = [("pure_data_parallel", gpus, 1, 1)]
    out += [("tensor_data_hybrid", gpus // tp, tp, 1) for tp in (2, 4)
            if gpus % tp == 0 and tp <= n_head]
    if gpus % 2 == 0:
        out.append(("pipeline_data_hybrid", gpus // 2, 1, 2))
    if gpus % 4 == 0:
        out.append(("full_model_parallel", gpus // 4, 2, 2))
    return out


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
    micro_batches: int
    weight_bytes_per_rank: int       # the fullest rank
    kv_cache_bytes_per_rank: int     # at input_len + output_len tokens
    total_bytes_per_rank: int
    device_memory_bytes: int
    headroom_bytes: int
    verdict: str                     # "fits" | "does not fit"
    bytes_per_decode_step: float     # slowest rank, mean decode context, weights per micro-batch
    tpot_ms_bound: float             # no decode step (token of a sequence) is faster
    tokens_per_s_bound: float        # all replicas together
    speedup_bound: float             # over the same batch on one GPU
    notes: tuple[str, ...]


def _micro_batches(batch_size: int, pp: int, requested: int | None) -> int:
    """DeepSpeed's eval_batch needs the batch split evenly; default pp (fills the pipe),
    else the largest divisor of the batch below it."""
    if pp == 1:
        return 1
    m = requested or pp
    if batch_size % m:
        if requested:
            raise UserError(f"workload.batch_size ({batch_size}) must be a multiple of "
                            f"topology.micro_batches ({requested})")
        m = max(k for k in range(1, m + 1) if batch_size % k == 0)
    return m


def _notes(model: ModelDims, tp: int, pp: int, m: int, batch: int, nbytes: int,
           shares: list[StageShare]) -> tuple[str, ...]:
    notes = []
    if tp > 1:
        from gptbench.autotp import heads_per_rank

        heads = "/".join(map(str, heads_per_rank(model.n_head, tp)))
        kib = batch * model.n_embd * nbytes / 1024
        notes.append(f"tp: heads {heads}; embeddings replicated, lm_head sharded; "
                     f"{2 * model.n_layer} all-reduces of {kib:g} KiB per step not modelled")
    if pp > 1:
        layers = ", ".join(f"[{s.layers[0]},{s.layers[1]})" for s in shares)
        notes.append(f"pp: stages hold layers {layers} of embed+{model.n_layer} blocks+head; "
                     f"each decode step pushes m={m} micro-batches through {pp} stages, a "
                     "stage re-reading its weights for each: per-token latency is not lowered")
    return tuple(notes)


def plan_grid(model: ModelDims, device, strategy: str, dp: int, tp: int, pp: int,
              batch_size: int, input_len: int, output_len: int, nbytes: int,
              micro_batches: int | None = None, partition_method: str = "parameters") -> dict:
    """Memory and bounds of one grid, as the PlanRow fields they determine."""
    m = _micro_batches(batch_size, pp, micro_batches)
    shares = stage_shares(model, tp, pp, partition_method)
    kvpt = kv_bytes_per_token(model, nbytes)
    end_context = input_len + output_len
    memory = [s.weight_params * nbytes + s.kv_fraction * batch_size * end_context * kvpt
              for s in shares]
    fullest = max(range(len(shares)), key=memory.__getitem__)
    mean_ctx = mean_decode_context(input_len, output_len)
    reads = [(s.weight_params * nbytes, s.kv_fraction * batch_size * mean_ctx * kvpt)
             for s in shares]
    step_s = decode_step_bound_s(device, reads, m)
    slowest_weights, slowest_kv = max(reads, key=lambda r: r[0] + r[1] / m)
    total = math.ceil(memory[fullest])
    return dict(
        strategy=strategy, dp=dp, tp=tp, pp=pp, micro_batches=m,
        weight_bytes_per_rank=shares[fullest].weight_params * nbytes,
        kv_cache_bytes_per_rank=total - shares[fullest].weight_params * nbytes,
        total_bytes_per_rank=total, device_memory_bytes=device.memory_bytes,
        headroom_bytes=device.memory_bytes - total,
        verdict="fits" if total <= device.memory_bytes else "does not fit",
        bytes_per_decode_step=m * slowest_weights + slowest_kv,
        tpot_ms_bound=step_s * 1e3,
        tokens_per_s_bound=dp * batch_size / step_s,
        notes=_notes(model, tp, pp, m, batch_size, nbytes, shares))


def plan(model_name_or_preset: str, gpus: int, gpu: str, batch_size: int = 4,
         input_len: int = 256, output_len: int = 64, dtype: str = "float16",
         micro_batches: int | None = None, partition_method: str = "parameters") -> list[PlanRow]:
    """One PlanRow per strategy that can be formed on `gpus` cards of kind `gpu`."""
    device = match_device(gpu)
    if device is None:
        raise UserError(f"unknown GPU '{gpu}' (known: {', '.join(DEVICES)})")
    for key, value in (("batch_size", batch_size), ("input_len", input_len),
                       ("output_len", output_len)):
        if value < 1:
            raise UserError(f"workload.{key}: must be positive, got {value}")
    model = model_dims(model_name_or_preset)
    if input_len + output_len > model.n_positions:
        raise UserError(f"input_len + output_len = {input_len + output_len} exceeds the "
                        f"{model.n_positions} positions of {model_name_or_preset}")
    nbytes = dtype_bytes(dtype)
    context = dict(model=model_name_or_preset, device=device.key, gpus=gpus, dtype=dtype,
                   batch_size=batch_size, input_len=input_len, output_len=output_len)
    one_gpu = plan_grid(model, device, "pure_data_parallel", 1, 1, 1, batch_size, input_len,
                        output_len, nbytes)
    rows = []
    for strategy, dp, tp, pp in grids(gpus, model.n_head):
        fields = plan_grid(model, device, strategy, dp, tp, pp, batch_size, input_len,
                           output_len, nbytes, micro_batches, partition_method)
        speedup = fields["tokens_per_s_bound"] / one_gpu["tokens_per_s_bound"]
        rows.append(PlanRow(**context, **fields, speedup_bound=speedup))
    return rows


def _size(nbytes: float) -> str:
    """Binary units, like nvidia-smi and torch.cuda; small models get MiB or KiB."""
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(nbytes) >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def format_plan(rows: list[PlanRow]) -> str:
    """A plain-text table of `rows` (all from one `plan` call), then the notes."""
    if not rows:
        return "no strategy can be formed\n"
    r0 = rows[0]
    device = DEVICES[r0.device]
    lines = [f"{r0.model} {r0.dtype} on {r0.gpus} x {device.name} "
             f"({_size(device.memory_bytes)}, {device.memory_bandwidth_bytes_per_s / 1e9:g} GB/s); "
             f"batch {r0.batch_size} per replica, {r0.input_len} -> {r0.output_len} tokens", ""]
    header = ("strategy", "dp x tp x pp", "m", "weights", "KV cache", "total",
              "verdict (headroom)", "TPOT >= ms", "tok/s <=", "x 1 GPU")
    table = [header]
    for r in rows:
        table.append((r.strategy, f"{r.dp} x {r.tp} x {r.pp}", str(r.micro_batches),
                      _size(r.weight_bytes_per_rank), _size(r.kv_cache_bytes_per_rank),
                      _size(r.total_bytes_per_rank), f"{r.verdict} ({_size(r.headroom_bytes)})",
                      f"{r.tpot_ms_bound:.3g}", f"{r.tokens_per_s_bound:,.0f}",
                      f"{r.speedup_bound:.2f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append("")
    lines += [f"{r.strategy}: {note}" for r in rows for note in r.notes]
    lines.append("Per rank: the fullest rank. Bounds: bytes read per decode step / peak "
                 "bandwidth, communication not modelled. Headroom must also hold the CUDA "
                 "context (~0.3-0.5 GiB) and activations.")
    return "\n".join(lines) + "\n"
