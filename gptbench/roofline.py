"""What the hardware allows: device peaks and the byte/FLOP arithmetic of GPT-2 generation.

Decode reads every weight (of this rank) plus the KV cache once per step and does ~2 FLOP
per weight byte pair, far below any GPU's FLOP:byte ratio, so its ceiling is memory
bandwidth (gpt-fast prints "Bandwidth achieved" beside tokens/s for the same reason).
Prefill of hundreds of tokens is compute-bound. Units: bytes, bytes/s, FLOP, FLOP/s;
GB/s in the output is 1e9 bytes/s as vendors quote it; memory sizes are binary (GiB).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gptbench.errors import UserError

GiB = 2 ** 30

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "half": 2}


@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    memory_bandwidth_bytes_per_s: float
    fp16_dense_flops_per_s: float
    memory_bytes: int


# Vendor datasheets; fp16 is dense tensor-core FLOP/s (datasheet "with sparsity" halved).
# GeForce cards run fp16 MMA with fp32 accumulation (what PyTorch's cuBLAS calls use) at
# half the fp16-accumulate rate, so their column is the fp32-accumulate figure.
# Memory sizes are binary GB, as nvidia-smi reports them (HBM parts show ~0.5% less).
DEVICES = {d.key: d for d in (
    # NVIDIA Ampere GA102 whitepaper v2.0, RTX 3080 column: 760 GB/s, 10 GB GDDR6X,
    # FP16 tensor with FP32 accumulate 59.5 TFLOPS.
    DeviceSpec("rtx3080", "GeForce RTX 3080", 760e9, 59.5e12, 10 * GiB),
    # NVIDIA Ada Lovelace whitepaper v2.1, RTX 4090: 1008 GB/s, 24 GB GDDR6X,
    # FP16 tensor with FP32 accumulate 165.2 TFLOPS.
    DeviceSpec("rtx4090", "GeForce RTX 4090", 1008e9, 165.2e12, 24 * GiB),
    # NVIDIA A10 datasheet: 600 GB/s, 24 GB GDDR6, FP16 tensor 125 TF (250 sparse).
    DeviceSpec("a10", "A10", 600e9, 125e12, 24 * GiB),
    # NVIDIA L4 datasheet: 300 GB/s, 24 GB GDDR6, FP16 tensor 242 TF with sparsity.
    DeviceSpec("l4", "L4", 300e9, 121e12, 24 * GiB),
    # NVIDIA A100 datasheet (2021): FP16 tensor 312 TF dense for every form factor;
    # 40GB: 1,555 GB/s (PCIe and SXM); 80GB: 1,935 GB/s PCIe, 2,039 GB/s SXM.
    DeviceSpec("a100-40gb", "A100 40GB SXM", 1555e9, 312e12, 40 * GiB),
    DeviceSpec("a100-40gb-pcie", "A100 40GB PCIe", 1555e9, 312e12, 40 * GiB),
    DeviceSpec("a100-80gb", "A100 80GB SXM", 2039e9, 312e12, 80 * GiB),
    DeviceSpec("a100-80gb-pcie", "A100 80GB PCIe", 1935e9, 312e12, 80 * GiB),
    # NVIDIA H100 datasheet: SXM 80 GB 3.35 TB/s, FP16 1,979 TF sparse; PCIe 80 GB
    # 2 TB/s, 1,513 TF sparse; NVL 94 GB 3.9 TB/s, 1,671 TF sparse.
    DeviceSpec("h100", "H100 SXM 80GB", 3.35e12, 989.5e12, 80 * GiB),
    DeviceSpec("h100-pcie", "H100 PCIe 80GB", 2.0e12, 756.5e12, 80 * GiB),
    DeviceSpec("h100-nvl", "H100 NVL 94GB", 3.9e12, 835.5e12, 94 * GiB),
    # NVIDIA H200 datasheet: 141 GB HBM3e, 4.8 TB/s; SXM 1,979 TF sparse, NVL 1,671.
    DeviceSpec("h200", "H200 SXM 141GB", 4.8e12, 989.5e12, 141 * GiB),
    DeviceSpec("h200-nvl", "H200 NVL 141GB", 4.8e12, 835.5e12, 141 * GiB),
)}

# Full-match patterns on the compacted name (lower case, alphanumerics only, "nvidia" and
# "geforce" dropped), first match wins. Anchored so that variants with other specs
# (RTX 3080 Ti, A10G, L40S, GH200) stay unknown rather than borrowing a wrong peak.
_NAME_PATTERNS = (
    (r"rtx3080", "rtx3080"),
    (r"rtx4090", "rtx4090"),
    (r"a10", "a10"),
    (r"l4", "l4"),
    (r"a100(?=.*pcie)(?=.*40gb).*", "a100-40gb-pcie"),
    (r"a100(?=.*pcie).*", "a100-80gb-pcie"),
    (r"a100(?=.*40gb).*", "a100-40gb"),
    (r"a100(sxm\d?)?(80gb)?(sxm\d?)?", "a100-80gb"),
    (r"h100(?=.*nvl).*", "h100-nvl"),
    (r"h100(?=.*pcie).*", "h100-pcie"),
    (r"h100(sxm\d?)?(80gb)?(hbm3)?(sxm\d?)?", "h100"),
    (r"h200(?=.*nvl).*", "h200-nvl"),
    (r"h200(sxm\d?)?(141gb)?(sxm\d?)?", "h200"),
)


def match_device(name: str) -> DeviceSpec | None:
    """The spec of a device named like torch.cuda.get_device_name() ("NVIDIA H100 80GB
    HBM3", "NVIDIA A100-SXM4-80GB") or a short key ("rtx3080", "h100-pcie"); else None."""
    compact = re.sub(r"[^a-z0-9]", "", (name or "").lower())
    compact = re.sub(r"^(nvidia)?(geforce)?", "", compact)
    for pattern, key in _NAME_PATTERNS:
        if re.fullmatch(pattern, compact):
            return DEVICES[key]
    return None


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype '{dtype}' has no known size (known: {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelDims:
    """The sizes the arithmetic needs. `params` counts tied weights once, like
    `sum(p.numel() for p in model.parameters())`."""
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    params: int
    tied_embeddings: bool = True

    @classmethod
    def of(cls, model) -> "ModelDims":
        """From a run record's model dict, or keyword sizes; `params`
        is computed with `gpt2_params` when absent."""
        get = model.get if isinstance(model, Mapping) else lambda k, d=None: getattr(model, k, d)
        sizes = {k: get(k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")}
        missing = [k for k, v in sizes.items() if v is None]
        if missing:
            raise UserError(f"model: missing {', '.join(missing)} for the roofline arithmetic")
        tied = bool(get("tied_embeddings", True))
        params = get("params") or gpt2_params(**sizes, tied_embeddings=tied)
        return cls(**sizes, params=int(params), tied_embeddings=tied)


def block_params(n_embd: int) -> int:
    """One GPT-2 block: c_attn d*3d+3d, attn c_proj d*d+d, c_fc d*4d+4d, mlp c_proj 4d*d+d,
    two LayerNorms 2*2d: 12d^2 + 13d."""
    return 12 * n_embd ** 2 + 13 * n_embd


def gpt2_params(n_layer, n_head, n_embd, vocab_size, n_positions, tied_embeddings=True) -> int:
    """wte + wpe + blocks + ln_f (+ an untied lm_head). GPT-2 XL: 1,557,611,200."""
    lm_head = 0 if tied_embeddings else vocab_size * n_embd
    return ((vocab_size + n_positions) * n_embd + n_layer * block_params(n_embd)
            + 2 * n_embd + lm_head)


def non_embedding_params(model: ModelDims) -> int:
    """Kaplan et al. 2020's N: everything but the token and position embeddings (and an
    untied lm_head, whose FLOPs are counted separately)."""
    embeddings = (model.vocab_size + model.n_positions) * model.n_embd
    lm_head = 0 if model.tied_embeddings else model.vocab_size * model.n_embd
    return model.params - embeddings - lm_head


def weight_bytes(params: int, dtype_bytes: int) -> int:
    return params * dtype_bytes


def kv_bytes_per_token(model: ModelDims, dtype_bytes: int) -> int:
    """K and V, n_embd wide, in every layer, for one token of one sequence.
    GPT-2 XL fp16: 2 * 48 * 1600 * 2 = 307,200 bytes."""
    return 2 * model.n_layer * model.n_embd * dtype_bytes


def mean_decode_context(input_len: int, output_len: int) -> float:
    """Mean tokens a decode step attends over. Token 0 comes from prefill; decode step
    j = 1..output_len-1 attends over input_len + j positions, whose mean is this (the
    bytes are linear in context, so the mean step reads the mean bytes)."""
    return input_len + output_len / 2


def decode_bytes_per_step(model: ModelDims, batch: int, context_len: float, dtype_bytes: int,
                          weight_fraction: float = 1.0, kv_fraction: float = 1.0) -> float:
    """Bytes one rank reads in a decode step: its share of the weights plus its share of
    the KV of `batch` sequences at `context_len`. Activations and logits (~batch*vocab*2 B)
    are left out: < 0.1% for GPT-2 XL."""
    weights = weight_fraction * weight_bytes(model.params, dtype_bytes)
    kv = kv_fraction * batch * context_len * kv_bytes_per_token(model, dtype_bytes)
    return weights + kv


def prefill_flops(model: ModelDims, batch: int, input_len: int,
                  logits_for_all_positions: bool = False) -> float:
    """Forward FLOPs of prefilling `batch` x `input_len` tokens. Per token:
    2N (Kaplan et al. 2020, Table 1, N non-embedding) + 4*n_layer*input_len*n_embd for
    QK^T and AV (PaLM, Chowdhery et al. 2022, App. B: 6N + 12LHQT for training, a third
    of it forward; causal masking is not credited) + 2*n_embd*vocab for the LM head
    (Kaplan's "De-embed") on the positions whose logits are computed. Generation needs
    only the last position's (transformers' logits_to_keep); counting all positions gives
    ~3.27 TFLOP for GPT-2 XL at 4x256 (docs/deepspeed-notes.md, GPT-2 XL arithmetic), the last only ~3.10 TFLOP."""
    tokens = batch * input_len
    per_token = 2 * non_embedding_params(model) + 4 * model.n_layer * input_len * model.n_embd
    logit_positions = tokens if logits_for_all_positions else batch
    return tokens * per_token + logit_positions * 2 * model.n_embd * model.vocab_size


def decode_bound_tokens_per_s(device: DeviceSpec, model: ModelDims, batch: int,
                              input_len: int, output_len: int, dtype_bytes: int) -> float:
    """Memory-bandwidth ceiling of one replica's decode: batch tokens per step, a step
    no faster than its bytes / peak bandwidth, averaged over the decode steps.
    GPT-2 XL fp16, batch 4, 256->64: ~876 tokens/s on an RTX 3080, ~3,863 on an H100 SXM."""
    step_bytes = decode_bytes_per_step(model, batch, mean_decode_context(input_len, output_len),
                                       dtype_bytes)
    return batch * device.memory_bandwidth_bytes_per_s / step_bytes


def decode_step_bound_s(device: DeviceSpec, stages: Sequence[tuple[float, float]],
                        micro_batches: int = 1) -> float:
    """Fastest possible decode step of one replica. `stages`: (weight bytes, KV bytes of
    the whole batch) of each pipeline stage's slowest rank; one stage when unpipelined.

    A pipeline step is one `eval_batch`: m micro-batches flow through the stages; a tick
    of stage s reads its weights and one micro-batch's KV. m identical jobs through a flow
    shop take sum(ticks) + (m-1)*max(ticks); equal ticks t give (m+p-1)*t.
    Tensor-parallel all-reduces are not modelled (they only add time)."""
    ticks_s = [(weights + kv / micro_batches) / device.memory_bandwidth_bytes_per_s
               for weights, kv in stages]
    return sum(ticks_s) + (micro_batches - 1) * max(ticks_s)


def _field(obj, key):
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def roofline_block(model_dims, workload, device_name: str | None,
                   measured_tpot_ms_p50: float | None, per_rank_weight_fraction: float = 1.0,
                   *, per_rank_kv_fraction: float | None = None, dp: int = 1, pp: int = 1,
                   micro_batches: int = 1) -> dict:
    """The run record's `metrics.roofline`, for the slowest rank of one replica.

    `workload` has batch_size (per replica), input_len, output_len and a resolved dtype;
    the fractions are that rank's share of weights and of KV (plan.rank_fractions).
    bytes_per_decode_step counts a pipeline stage's weights once per micro-batch.
    achieved_gbps = bytes_per_decode_step / measured TPOT; predicted_tokens_per_s is the
    bandwidth bound of all `dp` replicas together. Unknown values are None, and
    `reason` says why."""
    out = dict.fromkeys(("bytes_per_decode_step", "prefill_flops", "device_peak_gbps",
                         "achieved_gbps", "fraction_of_peak", "predicted_tokens_per_s"))
    reasons = []
    dtype = _field(workload, "dtype")
    if dtype not in DTYPE_BYTES:
        out["reason"] = f"dtype '{dtype}' has no known size"
        return out
    try:
        model = ModelDims.of(model_dims)
    except UserError as e:
        out["reason"] = str(e)
        return out
    nbytes = DTYPE_BYTES[dtype]
    batch = _field(workload, "batch_size")
    input_len, output_len = _field(workload, "input_len"), _field(workload, "output_len")
    kv_fraction = per_rank_weight_fraction if per_rank_kv_fraction is None else per_rank_kv_fraction
    rank_weights = per_rank_weight_fraction * weight_bytes(model.params, nbytes)
    rank_kv = (kv_fraction * batch * mean_decode_context(input_len, output_len)
               * kv_bytes_per_token(model, nbytes))
    out["bytes_per_decode_step"] = micro_batches * rank_weights + rank_kv
    out["prefill_flops"] = prefill_flops(model, batch, input_len)
    if measured_tpot_ms_p50:
        out["achieved_gbps"] = out["bytes_per_decode_step"] / (measured_tpot_ms_p50 / 1e3) / 1e9
    else:
        reasons.append("no measured TPOT")
    device = match_device(device_name)
    if device is None:
        reasons.append(f"device '{device_name}' has no known peak bandwidth")
    else:
        out["device_peak_gbps"] = device.memory_bandwidth_bytes_per_s / 1e9
        # Only this rank is known: stages taken as balanced.
        step_s = decode_step_bound_s(device, [(rank_weights, rank_kv)] * pp, micro_batches)
        out["predicted_tokens_per_s"] = dp * batch / step_s
        if out["achieved_gbps"] is not None:
            out["fraction_of_peak"] = out["achieved_gbps"] / out["device_peak_gbps"]
    out["reason"] = "; ".join(reasons) or None
    return out
