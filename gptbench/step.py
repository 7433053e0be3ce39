"""gptbench's own decode step: a lean GPT-2 forward over the (sharded) Hugging Face modules.

Why not Hugging Face's `GPT2Block.forward` under torch.compile: its static cache is updated
functionally (an out-of-place `index_copy` per layer plus a device-to-device write-back of
every cache buffer), its masks and output objects add kernels, and every parameter is a
graph input that CUDA graph trees check before each replay. Here a step is one function of
(input, position, KV buffers):

- the KV cache is plain buffers allocated before compilation, marked static and written by
  index on the base tensor (`k[:, :, positions] = k_new`, an `index_put_` inductor keeps in
  place: no copy, no cache among the graph's outputs);
- the position is a device scalar the step advances in place (no host value in the loop);
- the last stage picks the greedy token on the device (`argmax`) and returns (tokens,
  logits); other pipeline stages return their hidden state;
- the modules are the ones DeepSpeed built: Hugging Face's Conv1D or, after AutoTP, its
  column-sharded `LinearLayer` for c_attn/c_fc and row-sharded `LinearAllreduce` for the
  projections (the all-reduce runs inside the step, inside the compiled graph).

It computes what `GPT2Block` computes (pre-norm blocks, gelu MLP, scaled causal attention);
parity against the plain Hugging Face model is the proof (gptbench/parity.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION = ("math", "sdpa")


def block_heads(block, head_dim: int) -> int:
    """Attention heads this rank holds in `block` (AutoTP shards them, unevenly)."""
    from transformers.pytorch_utils import Conv1D

    layer = block.attn.c_attn  # Conv1D weight (d, 3*heads*hd); a Linear's (3*heads*hd, d)
    width = layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]
    return width // 3 // head_dim


@dataclass
class Role:
    """The modules one rank runs: the whole model, or one pipeline stage's share of it."""
    blocks: list
    head_dim: int
    wte: object = None     # first stage only
    wpe: object = None
    ln_f: object = None    # last stage only
    lm_head: object = None
    attention: str = "math"
    heads: list = field(default_factory=list)  # per block, this rank's heads

    def __post_init__(self):
        self.heads = [block_heads(b, self.head_dim) for b in self.blocks]

    @classmethod
    def whole(cls, model, attention: str = "math") -> "Role":
        t = model.transformer
        return cls(list(t.h), model.config.n_embd // model.config.n_head, t.wte, t.wpe,
                   t.ln_f, model.lm_head, attention)

    @property
    def is_first(self) -> bool:
        return self.wte is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None


class KVCache:
    """Per-block K and V buffers (batch, heads, max_len, head_dim) and the next position.

    Allocated zeroed before compilation (stale finite values beyond the position are masked;
    uninitialised memory could hold NaN, which a zero attention weight does not cancel) and
    marked static with a guard: each cache gets graphs recorded over its own addresses."""

    def __init__(self, role: Role, batch: int, max_len: int, dtype, device):
        shape = lambda h: (batch, h, max_len, role.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(h), dtype=dtype, device=device) for h in role.heads]
        self.v = [torch.zeros(shape(h), dtype=dtype, device=device) for h in role.heads]
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len
        for t in (*self.k, *self.v, self.position):
            torch._dynamo.mark_static_address(t, guard=True)

    def reset(self) -> None:
        """A new sequence: only the position goes back (the buffers keep their addresses)."""
        self.position.zero_()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def attend(q, k, v, positions, attention: str, scale: float):
    """Causal attention of q (B, H, T, hd) over the whole cache k, v (B, H, L, hd): query at
    position p sees keys 0..p. Math: softmax in float32, as inductor fuses it."""
    keys = torch.arange(k.shape[2], device=k.device)
    mask = keys[None, :] <= positions[:, None]  # (T, L)
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, T, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(q.dtype) @ v


def block_step(block, x, k_cache, v_cache, positions, heads: int, head_dim: int,
               attention: str, scale: float):
    """One GPT-2 block on x (B, T, d), writing this step's K and V into the cache in place."""
    b, t, _ = x.shape
    qkv = block.attn.c_attn(block.ln_1(x))  # (B, T, 3*H*hd): [Q | K | V] of this rank's heads
    q, k, v = (y.view(b, t, heads, head_dim).transpose(1, 2) for y in qkv.split(heads * head_dim, 2))
    k_cache[:, :, positions] = k  # index_put_ on the base buffer: inductor keeps it in place
    v_cache[:, :, positions] = v
    a = attend(q, k_cache, v_cache, positions, attention, scale)  # (B, H, T, hd)
    x = x + block.attn.c_proj(a.transpose(1, 2).reshape(b, t, heads * head_dim))
    return x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))


def _scale(block, head_dim: int) -> float:
    attn = block.attn
    scale = 1.0 / math.sqrt(head_dim) if getattr(attn, "scale_attn_weights", True) else 1.0
    if getattr(attn, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(attn.layer_idx + 1)
    return scale


def forward(role: Role, cache: KVCache, x: torch.Tensor):
    """One step of this rank's layers. x: token ids (B, T) on the first stage, hidden states
    (B, T, d) elsewhere. Advances the cache's position by T in place. Returns the hidden
    states (B, T, d), or on the last stage (tokens (B,), last-position logits (B, V))."""
    length = x.shape[1]
    positions = cache.position + torch.arange(length, device=x.device)  # (T,)
    if role.is_first:
        x = role.wte(x) + role.wpe(positions)
    for i, block in enumerate(role.blocks):
        x = block_step(block, x, cache.k[i], cache.v[i], positions, role.heads[i], role.head_dim,
                       role.attention, _scale(block, role.head_dim))
    cache.position.add_(length)
    if not role.is_last:
        return x
    # (B, 1, d) in: AutoTP's sharded lm_head slices its input's last dim as x[:, :, a:b]
    logits = role.lm_head(role.ln_f(x[:, -1:, :]))[:, -1, :]  # (B, V)
    return logits.argmax(dim=-1), logits
