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


class StepLM:
    """Greedy stepping through gptbench's compiled step (gptbench/step.py) over the modules
    DeepSpeed built (`module`: the model, whole or AutoTP-sharded).

    One KV cache per batch size (a parity probe may be smaller than the workload's batches);
    a new batch only resets the cache's position, so the buffers keep their addresses. Tokens
    and logits stay on the device; under CUDA graphs they are cloned out of the graph's
    output buffers, which the next replay rewrites."""

    def __init__(self, module, options, max_len: int, device, dtype):
        from gptbench import step

        self.module, self.options = module, options
        self.max_len, self.device, self.dtype = max_len, device, dtype
        self.role = step.Role.whole(module, options.attention)
        self.fn = options.compile(step.forward)
        self.caches: dict[int, object] = {}
        self.cache = None

    def _run(self, ids: torch.Tensor) -> Step:
        from gptbench.compiled import mark_step

        if self.options.cudagraphs:
            mark_step()
        tokens, logits = self.fn(self.role, self.cache, ids)
        if self.options.cudagraphs:
            tokens, logits = tokens.clone(), logits.clone()
        return Step(tokens=tokens, logits=logits, input_len=ids.shape[1])

    def prefill(self, input_ids):
        from gptbench.step import KVCache

        batch = input_ids.shape[0]
        if batch not in self.caches:
            self.caches[batch] = KVCache(self.role, batch, self.max_len, self.dtype, self.device)
        self.cache = self.caches[batch]
        self.cache.reset()
        return self._run(input_ids)

    def decode(self, tokens):
        return self._run(tokens[:, None])
