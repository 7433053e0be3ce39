"""What the hardware allows: device peaks and the byte/FLOP arithmetic of GPT-2 generation.

Decode reads every weight (of this rank) plus the KV cache once per step and does ~2 FLOP
per weight byte pair, far below any GPU's FLOP:byte ratio, so its ceiling is memory
bandwidth (gpt-fast prints "Bandwidth achieved" beside tokens/s for the same reason).
Prefill of hundreds of tokens is compute-bound. Units: bytes, bytes/s, FLOP, FLOP/s;
GB/s in the output is 1e9 bytes/s as vendors quote it; memory sizes are binary (GiB).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gptbench.errors import UserError
from gptbench.sharding import Layout

GiB = 2 ** 30

# The config's vocabulary (workload.dtype), the only one plan and the record speak.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
        raise UserError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def custom_device(memory_gib: float, bandwidth_gbps: float, name: str = "custom GPU",
                  base: DeviceSpec | None = None) -> DeviceSpec:
    """A card gptbench does not list (or a listed one with other figures): memory in GiB
    as nvidia-smi shows it, bandwidth in GB/s (1e9 bytes/s) as datasheets quote it."""
    for key, value in (("--gpu-memory-gib", memory_gib), ("--gpu-bandwidth-gbps", bandwidth_gbps)):
        if value is not None and not value > 0:
            raise UserError(f"{key}: must be positive, got {value}")
    return DeviceSpec(
        key=base.key if base else "custom", name=base.name if base else name,
        memory_bandwidth_bytes_per_s=(bandwidth_gbps * 1e9 if bandwidth_gbps is not None
                                      else base.memory_bandwidth_bytes_per_s),
        fp16_dense_flops_per_s=base.fp16_dense_flops_per_s if base else float("nan"),
        memory_bytes=int(memory_gib * GiB) if memory_gib is not None else base.memory_bytes)


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


def kv_bytes_per_token(model: ModelDims, dtype_bytes: int) -> int:
    """K and V, n_embd wide, in every layer, for one token of one sequence.
    GPT-2 XL fp16: 2 * 48 * 1600 * 2 = 307,200 bytes."""
    return 2 * model.n_layer * model.n_embd * dtype_bytes


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


def token_time_s(tick_s: Sequence[float], micro_batches: int = 1, schedule: str = "flush",
                 hop_s: float = 0.0, step_sync_s: float = 0.0, back_s: float | None = None,
                 ready_s: Sequence[float] | None = None) -> float:
    """Time between two tokens of one sequence. `tick_s`: per pipeline stage, the time its
    slowest rank needs to push one micro-batch one decode step through its layers (one
    element when unpipelined); `hop_s`: receiving one micro-batch from the previous stage,
    paid by the receiving stage on every tick (a receive costs its latency even when the
    data is already there); `back_s`: the in-flight ring's new tokens, received by the first
    stage (default: a hop); `step_sync_s`: what a step adds once (flush: eval_batch's
    barrier, the token broadcast); `ready_s`: in flight, per stage, what a receive costs
    when its input is already waiting (the busiest stage's case; default: hop / back).

    - flush (one `eval_batch` per token): m identical jobs through a flow shop take
      sum(ticks) + (m-1)*max(ticks); equal ticks t give (m+p-1)*t, so the bubble is
      (p-1)/(m+p-1).
    - in_flight (m >= p micro-batches circulate): a sequence's next token waits for a lap
      of the ring (every stage's tick) or for the busiest stage to serve all m
      micro-batches, whichever is longer: the pipeline fills once per generation, bubble
      (p-1)/(N*m+p-1) over N tokens."""
    p, m = len(tick_s), micro_batches
    if p == 1:
        return m * tick_s[0] + step_sync_s
    back = hop_s if back_s is None else back_s
    if schedule == "in_flight":
        ready = ready_s or [back if s == 0 else hop_s for s in range(p)]
        busy = [t + r for t, r in zip(tick_s, ready)]
        lap = sum(tick_s) + (p - 1) * hop_s + back
        return max(m * max(busy), lap) + step_sync_s
    busy = [t + (hop_s if s > 0 else 0.0) for s, t in enumerate(tick_s)]
    return sum(busy) + (m - 1) * max(busy) + step_sync_s


def bubble_theory(pp: int, micro_batches: int, schedule: str, tokens: int) -> float | None:
    """Idle share of a pipeline stage with equal ticks: flush (p-1)/(m+p-1) per token;
    in_flight (p-1)/(N*m+p-1) over a generation of N = output_len forward passes."""
    if pp <= 1:
        return None
    if schedule == "in_flight":
        return (pp - 1) / (tokens * micro_batches + pp - 1)
    return (pp - 1) / (micro_batches + pp - 1)


def decode_step_bound_s(device: DeviceSpec, stages: Sequence[tuple[float, float]],
                        micro_batches: int = 1, schedule: str = "flush") -> float:
    """Fastest possible time per token of one replica when reading bytes is all it does.
    `stages`: (weight bytes read per micro-batch, KV bytes of the whole batch) of each
    stage's slowest rank; a tick reads its weights and one micro-batch's KV.
    Communication is added by the caller (predicted TPOT), not here."""
    ticks_s = [(weights + kv / micro_batches) / device.memory_bandwidth_bytes_per_s
               for weights, kv in stages]
    return token_time_s(ticks_s, micro_batches, schedule)


def layout_bound_s(device: DeviceSpec, lay: Layout) -> float:
    """The bandwidth bound of a sharding layout (sharding.Layout), per its schedule."""
    ticks_s = [b / lay.micro_batches / device.memory_bandwidth_bytes_per_s
               for b in lay.stage_step_bytes()]
    return token_time_s(ticks_s, lay.micro_batches, lay.schedule)


def roofline_block(lay: Layout, device_name: str | None,
                   measured_tpot_ms_p50: float | None, device: DeviceSpec | None = None) -> dict:
    """The run record's `metrics.roofline`, for the slowest rank of one replica.

    bytes_per_decode_step: what that rank reads in one decode step (its weights once per
    micro-batch, embedding rows gathered, the KV of its heads at the mean context);
    achieved_gbps = bytes / measured TPOT; predicted_tokens_per_s is the bandwidth bound of
    all `dp` replicas together. Unknown values are None, and `reason` says why."""
    out = dict.fromkeys(("bytes_per_decode_step", "prefill_flops", "device_peak_gbps",
                         "achieved_gbps", "fraction_of_peak", "predicted_tokens_per_s"))
    reasons = []
    out["bytes_per_decode_step"] = lay.decode_step_bytes(lay.slowest())
    out["prefill_flops"] = prefill_flops(lay.model, lay.batch_size, lay.input_len)
    if measured_tpot_ms_p50:
        out["achieved_gbps"] = out["bytes_per_decode_step"] / (measured_tpot_ms_p50 / 1e3) / 1e9
    else:
        reasons.append("no measured TPOT")
    device = device or match_device(device_name)
    if device is None:
        reasons.append(f"device '{device_name}' has no known peak bandwidth")
    else:
        out["device_peak_gbps"] = device.memory_bandwidth_bytes_per_s / 1e9
        out["predicted_tokens_per_s"] = lay.dp * lay.batch_size / layout_bound_s(device, lay)
        if out["achieved_gbps"] is not None:
            out["fraction_of_peak"] = out["achieved_gbps"] / out["device_peak_gbps"]
    out["reason"] = "; ".join(reasons) or None
    return out


LatencyUs = Callable[[str, int, int], "float | None"]  # (op, group size, bytes) -> µs


def _ready_receive_s(lay: Layout, collectives: list[dict], latency_us: LatencyUs) -> list[float]:
    """In flight, per stage and micro-batch, what its receive costs when the input is
    already waiting (`p2p_ready`; else the plain p2p latency): the first stage receives the
    new tokens (back), the others the hidden states (hop)."""
    hops, m = max(1, (lay.pp - 1) * lay.micro_batches), lay.micro_batches

    def receive_s(where: str) -> float:
        return sum(1e-6 * (latency_us("p2p_ready", 2, c["bytes"]) or c["latency_us"] or 0.0)
                   * c["per_step"] / (hops if where == "hop" else m)
                   for c in collectives if c["where"] == where)

    return [receive_s("back") if s == 0 else receive_s("hop") for s in range(lay.pp)]


def predict_tpot(lay: Layout, stage_compute_s: Sequence[float], latency_us: LatencyUs | None,
                 compute_source: str, latency_source: str) -> dict:
    """`metrics.predicted` / plan's TPOT: the compute of each stage (its slowest rank, one
    decode step of the whole replica batch, communication excluded) pushed through the
    schedule (token_time_s), plus every collective of the step (sharding.Layout
    .collectives) at its latency. A collective whose latency is unknown counts 0 and is
    named in `unknown_latency`."""
    m, unknown = lay.micro_batches, []
    collectives = []
    for c in lay.collectives():
        value = latency_us(c.op, c.group_size, c.nbytes) if latency_us else None
        if value is None:
            unknown.append(f"{c.op} on {c.group} ({c.nbytes} B)")
        collectives.append({**c.as_dict(), "latency_us": value})
    seconds = lambda c: (c["latency_us"] or 0.0) * 1e-6  # noqa: E731
    tick_s = [compute / m for compute in stage_compute_s]
    for c in collectives:
        if c["where"] == "tick":
            tick_s[c["stage"]] += c["per_step"] / m * seconds(c)
    hops = max(1, (lay.pp - 1) * m)
    hop_s = sum(c["per_step"] / hops * seconds(c) for c in collectives if c["where"] == "hop")
    back = [c["per_step"] / m * seconds(c) for c in collectives if c["where"] == "back"]
    step_s = sum(c["per_step"] * seconds(c) for c in collectives if c["where"] == "step")
    ready_s = (_ready_receive_s(lay, collectives, latency_us)
               if lay.schedule == "in_flight" and latency_us else None)
    tpot_s = token_time_s(tick_s, m, lay.schedule, hop_s, step_s, sum(back) if back else None,
                          ready_s)
    compute_only_s = token_time_s([c / m for c in stage_compute_s], m, lay.schedule)
    return {
        "tpot_ms": tpot_s * 1e3,
        "compute_ms_per_step": [c * 1e3 for c in stage_compute_s],
        "compute_source": compute_source,
        "ready_receive_ms": None if ready_s is None else [r * 1e3 for r in ready_s],
        "comm_ms_per_token": (tpot_s - compute_only_s) * 1e3,
        "collectives": collectives,
        "latency_source": latency_source,
        "unknown_latency": unknown or None,
        "schedule": lay.schedule, "micro_batches": m, "pp": lay.pp, "tp": lay.tp,
        "model": "roofline.token_time_s: tick = compute/m + tensor all-reduces; flush: a "
                 "stage's tick also pays its receive, token = sum(ticks) + (m-1) max(tick) + "
                 "barrier + token broadcast; in_flight = max(m x (tick + receive of an input "
                 "already waiting: p2p_ready), a lap of the ring)",
    }
