"""What every strategy hands the runner: a two-call generator over its sharded model.

`prefill(input_ids)` starts a new batch (fresh KV cache) and `decode(tokens)` runs one
step; both return the next greedy tokens on every rank of the replica, and the last
position's logits where this rank holds them (None elsewhere), for the parity check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch


@dataclass
class Step:
    tokens: torch.Tensor            # (B,) next greedy tokens
    logits: Optional[torch.Tensor]  # (B, V) last-position logits, or None on this rank
    input_len: int                  # tokens fed per sequence in this step (1 when decoding)


class Generator(Protocol):
    def prefill(self, input_ids: torch.Tensor) -> Step: ...

    def decode(self, tokens: torch.Tensor) -> Step: ...


@dataclass
class RankContext:
    """Everything a strategy's `build` needs, created once per rank by the worker."""
    cfg: object                     # gptbench.config.RunConfig
    grid: object                    # gptbench.topology.Grid
    rank: int
    device: torch.device
    dtype: torch.dtype
    model: object                   # the unsharded Hugging Face GPT2LMHeadModel
    tp_group: object = None
    tp_ranks: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what the strategy reports (head split, stages)


class CachedLM:
    """Greedy stepping of a Hugging Face causal LM (or a DeepSpeed engine wrapping one)."""

    def __init__(self, forward, config):
        self.forward, self.config = forward, config
        self.cache = None

    @property
    def module(self):
        return getattr(self.forward, "module", self.forward)

    def _run(self, ids: torch.Tensor) -> Step:
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.config)
        out = self.forward(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]  # (B, V)
        return Step(tokens=logits.argmax(dim=-1), logits=logits, input_len=ids.shape[1])

    def prefill(self, input_ids):
        self.cache = None
        return self._run(input_ids)

    def decode(self, tokens):
        return self._run(tokens[:, None])


class StaticLM:
    """Greedy stepping over a static KV cache, through a (possibly compiled) forward.

    `forward` is the model or DeepSpeed engine whose module was compiled; `model` the Hugging
    Face module it runs (its config and, after AutoTP, its sharded head counts size the cache).
    One cache per batch size (a parity probe may be smaller than the workload's batches); a
    new batch starts by zeroing the cache in place, so CUDA graphs keep their addresses.
    """

    def __init__(self, forward, model, max_len: int, device, dtype, cudagraphs: bool):
        self.forward, self.model = forward, model
        self.max_len, self.device, self.dtype = max_len, device, dtype
        self.cudagraphs = cudagraphs
        self.caches: dict[int, object] = {}
        self.cache = None

    @property
    def module(self):
        return getattr(self.forward, "module", self.forward)

    def _run(self, ids: torch.Tensor) -> Step:
        from gptbench.compiled import mark_step

        if self.cudagraphs:
            mark_step()
        out = self.forward(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]  # (B, V)
        if self.cudagraphs:
            logits = logits.clone()  # the graph's output buffer is rewritten by the next replay
        return Step(tokens=logits.argmax(dim=-1), logits=logits, input_len=ids.shape[1])

    def prefill(self, input_ids):
        from gptbench.compiled import heads_per_block, static_cache

        batch = input_ids.shape[0]
        if batch not in self.caches:
            self.caches[batch] = static_cache(self.model.config, heads_per_block(self.model),
                                              batch, self.max_len, self.dtype, self.device)
        self.cache = self.caches[batch]
        self.cache.reset()
        return self._run(input_ids)

    def decode(self, tokens):
        return self._run(tokens[:, None])
