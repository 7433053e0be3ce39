"""One sharding model of GPT-2 generation: what each rank holds, reads per decode step and
sends, for every grid dp x tp x pp. `gptbench plan`, the run record's roofline and memory
(`metrics.roofline`, `metrics.model_memory_bytes`) and the predicted TPOT
(`metrics.predicted`) all read it, so they cannot disagree.

What a rank holds follows the mechanisms gptbench uses (README, "What we learned"):
- data parallel: the whole model per rank.
- tensor parallel (AutoTP, DeepSpeed 0.19.8 `module_inject/tp_shard.py: get_shard_size`):
  attention split by heads (25 -> 13/12, the first ranks hold one more); MLP columns in
  grains of head_dim (4*n_head grains, near even); LayerNorms and row-parallel biases
  whole; the embeddings (wte, wpe) replicated; the lm_head re-made as a new tensor
  (`LmHeadLinearAllreduce` clones it) split along its *input* features in grains of
  head_dim (1600 -> 832/768), so every rank holds vocab x its share and all-reduces the
  (batch, vocab) logits.
- pipeline (PipelineModule): contiguous [embedding, blocks..., ln_f + lm_head] split by
  parameter count (partition_method "parameters") or layer count ("uniform"); a tied
  lm_head on another stage than wte is a second vocab x d tensor.
A decode step reads, per micro-batch, every weight of the rank's blocks and head, the KV
of its heads, and only the gathered rows of the embeddings (one wte and one wpe row per
sequence), not the whole tables.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from gptbench.errors import UserError

# DeepSpeed 0.19.8 runtime/pipe/engine.py: every activation send carries a metadata
# tensor of TENSOR_META_SIZE int32 first (dynamic_shape=True), then each tensor; gptbench's
# stages pass the hidden state alone (mb, 1, d) (strategies/pipeline.py, Stage).
TENSOR_META_SIZE = 256
INT64_BYTES = 8


@dataclass(frozen=True)
class RankShare:
    """What one rank (pipeline stage `stage`, tensor rank `tp_rank`) holds."""
    stage: int
    tp_rank: int
    layers: tuple[int, int]      # [first, last) in [embedding, blocks..., head] numbering
    blocks: int
    heads: int                   # attention heads of this rank in each of its blocks
    weight_params: int           # parameters held
    block_params: int            # of those, in the blocks
    holds_embedding: bool
    holds_head: bool
    head_params: int             # ln_f + the lm_head share it holds
    head_read_params: int        # ln_f + the lm_head it multiplies by (tied: wte itself)
    kv_elements_per_token: int   # K and V of one sequence's token, this rank's heads/blocks


@dataclass(frozen=True)
class Collective:
    """Communication of one decode step of one replica.

    where: "tick" (inside every micro-batch pass of pipeline stage `stage`: the tensor
    all-reduces), "hop" (moving one micro-batch to the next stage), "back" (the in-flight
    ring's new tokens, last stage to first) or "step" (once per decode step)."""
    op: str          # all_reduce | p2p | barrier | broadcast
    group: str       # tp | pipe | world | stage_pair
    group_size: int
    nbytes: int
    per_step: int    # how many per decode step of the replica
    where: str
    why: str
    stage: int | None = None

    def as_dict(self) -> dict:
        return {"op": self.op, "group": self.group, "group_size": self.group_size,
                "bytes": self.nbytes, "per_step": self.per_step, "where": self.where,
                "stage": self.stage, "why": self.why}


def head_dim(model) -> int:
    return model.n_embd // model.n_head


def heads_per_rank(n_head: int, tp: int) -> list[int]:
    """AutoTP's head split: the first n_head % tp ranks take one more."""
    return [n_head // tp + (1 if r < n_head % tp else 0) for r in range(tp)]


def grain_shares(total: int, tp: int, grain: int) -> list[int]:
    """DeepSpeed's get_shard_size without a head count: whole grains near evenly, the first
    ranks one more, the last rank also the remainder (total % grain)."""
    if total < grain:
        return [total // tp + (1 if r < total % tp else 0) for r in range(tp)]
    grains, remainder = divmod(total, grain)
    return [(grains // tp + (1 if r < grains % tp else 0)) * grain
            + (remainder if r == tp - 1 else 0) for r in range(tp)]


def block_params(model, tp: int = 1, tp_rank: int = 0) -> int:
    """One block's parameters on tensor rank `tp_rank` (shapes: in x out)."""
    d = model.n_embd
    attn = heads_per_rank(model.n_head, tp)[tp_rank] * head_dim(model)  # this rank's width
    ff = grain_shares(4 * d, tp, head_dim(model))[tp_rank]              # MLP columns
    return (d * 3 * attn + 3 * attn     # c_attn (d, 3*attn), column-parallel
            + attn * d + d              # attn c_proj (attn, d), row-parallel, bias whole
            + d * ff + ff               # c_fc (d, ff)
            + ff * d + d                # mlp c_proj (ff, d), bias whole
            + 4 * d)                    # ln_1, ln_2


def _lm_head_params(model, tp: int, pp: int, tp_rank: int, same_stage_as_wte: bool) -> int:
    """The lm_head a rank holds beside ln_f: none when it is wte itself (tied, unsharded,
    on wte's stage), else vocab x its input share."""
    if tp > 1:
        return model.vocab_size * grain_shares(model.n_embd, tp, head_dim(model))[tp_rank]
    if model.tied_embeddings and same_stage_as_wte:
        return 0
    return model.vocab_size * model.n_embd


def layer_params(model, tp: int = 1, pp: int = 1, tp_rank: int = 0) -> list[int]:
    """Parameters of [embedding, block * n_layer, head] on tensor rank `tp_rank`, as
    PipelineModule sees them (the head counted as its own lm_head)."""
    d = model.n_embd
    lm_head = _lm_head_params(model, tp, pp, tp_rank, same_stage_as_wte=pp == 1)
    return ([(model.vocab_size + model.n_positions) * d]
            + [block_params(model, tp, tp_rank)] * model.n_layer
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


def stage_bounds(model, tp: int, pp: int, partition_method: str = "parameters") -> list[int]:
    """Layer boundaries of the pipeline stages (tensor rank 0's parameter counts)."""
    if partition_method not in ("parameters", "uniform"):
        raise UserError(f"topology.partition_method: '{partition_method}' is not one of "
                        "parameters, uniform")
    layers = layer_params(model, tp, pp)
    if pp > len(layers):
        raise UserError(f"pp={pp} exceeds the {len(layers)} pipeline layers of the model")
    if partition_method == "parameters":
        return _split_balanced(layers, pp)
    return _split_uniform(len(layers), pp)


def rank_shares(model, tp: int = 1, pp: int = 1,
                partition_method: str = "parameters") -> list[list[RankShare]]:
    """shares[stage][tp_rank]: what each rank of one replica holds."""
    bounds = stage_bounds(model, tp, pp, partition_method)
    out = []
    for stage, (first, last) in enumerate(zip(bounds, bounds[1:])):
        row = []
        for r in range(tp):
            holds_embedding, holds_head = first == 0, last == model.n_layer + 2
            layers = layer_params(model, tp, pp, r)
            blocks = len(range(max(first, 1), min(last, model.n_layer + 1)))
            heads = heads_per_rank(model.n_head, tp)[r]
            head = head_read = 0
            if holds_head:
                head = 2 * model.n_embd + _lm_head_params(
                    model, tp, pp, r, same_stage_as_wte=holds_embedding)
                head_read = 2 * model.n_embd + model.vocab_size * grain_shares(
                    model.n_embd, tp, head_dim(model))[r]
            row.append(RankShare(
                stage=stage, tp_rank=r, layers=(first, last), blocks=blocks, heads=heads,
                weight_params=sum(layers[first:last - 1]) + (head if holds_head else layers[last - 1]),
                block_params=blocks * layers[1], holds_embedding=holds_embedding,
                holds_head=holds_head, head_params=head, head_read_params=head_read,
                kv_elements_per_token=2 * blocks * heads * head_dim(model)))
        out.append(row)
    return out


def read_params_per_tick(model, share: RankShare, mb: int) -> int:
    """Weights one rank reads to push `mb` sequences one decode step through its layers:
    its blocks and head whole, one wte and one wpe row per sequence (a gather)."""
    rows = 2 * mb * model.n_embd if share.holds_embedding else 0
    return share.block_params + share.head_read_params + rows


def mean_decode_context(input_len: int, output_len: int) -> float:
    """Mean tokens a decode step attends over. Token 0 comes from prefill; decode step
    j = 1..output_len-1 attends over input_len + j positions, whose mean is this (the
    bytes are linear in context, so the mean step reads the mean bytes)."""
    return input_len + output_len / 2


@dataclass(frozen=True)
class Layout:
    """The sharding model's answer for one replica of a run or plan row.

    Lists run over the replica's ranks in (stage, tp_rank) order; `global_ranks` maps them
    onto a whole run (every data-parallel replica holds the same)."""
    model: object
    dp: int
    tp: int
    pp: int
    micro_batches: int
    batch_size: int          # per replica
    input_len: int
    output_len: int
    dtype_bytes: int
    schedule: str            # flush | in_flight (pipelines; "none" when pp == 1)
    shares: list = field(repr=False)

    @property
    def ranks(self) -> list[RankShare]:
        return [s for stage in self.shares for s in stage]

    def weight_bytes(self, share: RankShare) -> int:
        return share.weight_params * self.dtype_bytes

    def kv_bytes(self, share: RankShare, context: float | None = None) -> float:
        """KV cache of the replica's batch (all m micro-batch caches) on this rank."""
        context = self.input_len + self.output_len if context is None else context
        return share.kv_elements_per_token * self.batch_size * context * self.dtype_bytes

    def decode_step_bytes(self, share: RankShare) -> float:
        """Bytes this rank reads in one decode step (m ticks) at the mean context."""
        mb = self.batch_size / self.micro_batches
        weights = self.micro_batches * read_params_per_tick(self.model, share, mb)
        context = mean_decode_context(self.input_len, self.output_len)
        return weights * self.dtype_bytes + self.kv_bytes(share, context)

    def stage_step_bytes(self) -> list[float]:
        """Per stage, the bytes its slowest tensor rank reads in one decode step."""
        return [max(self.decode_step_bytes(s) for s in stage) for stage in self.shares]

    def slowest(self) -> RankShare:
        return max(self.ranks, key=self.decode_step_bytes)

    def memory(self) -> dict:
        """`metrics.model_memory_bytes`: per global rank, weights + KV at the last token."""
        by_stage_tp = {(s.stage, s.tp_rank): s for s in self.ranks}
        order = [by_stage_tp[(p, t)] for p in range(self.pp) for _ in range(self.dp)
                 for t in range(self.tp)]  # global rank = (p * dp + d) * tp + t
        weights = [self.weight_bytes(s) for s in order]
        kv = [math.ceil(self.kv_bytes(s)) for s in order]
        return {"per_rank": [w + k for w, k in zip(weights, kv)], "weights": weights,
                "kv": kv, "source": "gptbench.sharding (weights + KV of the batch at "
                                    "input_len + output_len tokens, no activations)"}

    def collectives(self, tokens: int = 1) -> list[Collective]:
        """Communication of one decode step of this replica (DeepSpeed 0.19.8's call sites,
        trackers/comm.py; counted on real runs in tests/integration/test_breakdown.py); of the
        prefill with `tokens` = input_len (hidden states of every position; the logits stay
        one position: logits_to_keep=1)."""
        model, m = self.model, self.micro_batches
        mb = self.batch_size // m
        out = []
        for stage in self.shares if self.tp > 1 else []:
            fullest = stage[0]
            if fullest.blocks:
                out.append(Collective(
                    "all_reduce", "tp", self.tp, mb * tokens * model.n_embd * self.dtype_bytes,
                    2 * fullest.blocks * m, "tick",
                    "attn.c_proj and mlp.c_proj outputs of every block", fullest.stage))
            if fullest.holds_head:
                out.append(Collective(
                    "all_reduce", "tp", self.tp, mb * model.vocab_size * self.dtype_bytes,
                    m, "tick", "lm_head logits (row-parallel)", fullest.stage))
        if self.pp > 1:
            out += self._pipeline_collectives(mb, tokens)
        return out

    def _pipeline_collectives(self, mb: int, tokens: int = 1) -> list[Collective]:
        model, m, hops = self.model, self.micro_batches, (self.pp - 1) * self.micro_batches
        hidden = mb * tokens * model.n_embd * self.dtype_bytes
        if self.schedule == "in_flight":
            return [Collective("p2p", "stage_pair", 2, hidden, hops, "hop",
                               "activations to the next stage"),
                    Collective("p2p", "stage_pair", 2, mb * INT64_BYTES, m, "back",
                               "new tokens from the last stage back to the first")]
        return [
            Collective("barrier", "world", self.dp * self.tp * self.pp, 0, 1, "step",
                       "PipelineEngine.eval_batch starts with a global barrier"),
            Collective("p2p", "stage_pair", 2, TENSOR_META_SIZE * 4, hops, "hop",
                       "shape metadata before each activation send (dynamic_shape)"),
            Collective("p2p", "stage_pair", 2, hidden, hops, "hop", "hidden state"),
            Collective("broadcast", "pipe", self.pp, self.batch_size * INT64_BYTES, 1, "step",
                       "new tokens from the last stage to the pipe group"),
        ]


def layout(model, dp: int, tp: int, pp: int, micro_batches: int, batch_size: int,
           input_len: int, output_len: int, dtype_bytes: int, schedule: str = "flush",
           partition_method: str = "parameters") -> Layout:
    return Layout(model=model, dp=dp, tp=tp, pp=pp, micro_batches=micro_batches,
                  batch_size=batch_size, input_len=input_len, output_len=output_len,
                  dtype_bytes=dtype_bytes, schedule=schedule if pp > 1 else "none",
                  shares=rank_shares(model, tp, pp, partition_method))


def host_memory_bytes(lay: Layout, device_type: str = "cpu",
                      weights: str = "random") -> list[int]:
    """Model bytes in host memory on each rank of one replica at the peak of loading.

    gptbench/worker.py: every rank builds the whole unsharded model in the run's dtype
    (models.load_model), runs the parity reference on it before sharding, then the
    strategy shards it; the unsharded model is freed only once the strategy is built, so
    at the peak a rank holds the whole model plus the tensors sharding made anew (AutoTP
    copies its shards; a pipeline stage keeps the original modules; data parallel wraps
    the model as it is). On CUDA, random weights are built on the GPU (no host copy);
    a pretrained checkpoint is read into host memory first (the whole model)."""
    whole = lay.model.params * lay.dtype_bytes
    if device_type == "cuda":
        return [whole if weights == "pretrained" else 0 for _ in lay.ranks]
    return [whole + (lay.weight_bytes(s) if lay.tp > 1 else 0) for s in lay.ranks]
