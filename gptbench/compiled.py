"""Compiled decode: a static KV cache and torch.compile (CUDA graphs on GPUs).

Why: on a GPU, eager decode of GPT-2 XL at batch 4 is hundreds of small kernels per token
(48 blocks x ~20 ops), each paying several microseconds of host launch time, so a step
takes several milliseconds while reading the weights takes ~1. A static KV cache (fixed
shapes, fixed addresses) lets torch.compile fuse the step and, in mode="reduce-overhead",
capture it in a CUDA graph that replays with one launch (what gpt-fast, vLLM and
TensorRT-LLM do for small-batch decode).

What costs: compilation (tens of seconds per rank, per shape: prefill and decode), never
timed. `CompileStats` reads torch's own counters: seconds inside dynamo/inductor, graph
breaks, graphs compiled. CUDA graph trees record a graph on the second call of a shape and
replay from the third, so the warm-up calls every shape `WARMUP_CALLS` times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gptbench.runplan import effective_mode  # noqa: F401 - decided before any rank starts

WARMUP_CALLS = 3  # 1: warm-up run, 2: CUDA graph recorded, 3: replayed (torch's cudagraph trees)


def compile_kwargs(mode: str) -> dict:
    """torch.compile arguments for an effective mode other than off. Shapes never change
    within a shape class (prefill, decode), so dynamic=False: one specialised graph each."""
    kwargs = {"dynamic": False}
    if mode == "reduce-overhead":
        kwargs["mode"] = "reduce-overhead"
    return kwargs


def mark_step() -> None:
    """Tell CUDA graph trees a new step begins: the previous step's outputs may be overwritten
    (we keep none of them: logits are cloned, tokens come from a separate argmax)."""
    torch.compiler.cudagraph_mark_step_begin()


@dataclass
class CompileStats:
    """Deltas of torch's compile counters over a span of this process."""
    compile_s: float
    graph_breaks: int
    graphs: int

    @staticmethod
    def _now() -> tuple[float, int, int]:
        from torch._dynamo.utils import compilation_time_metrics, counters

        seconds = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        return (seconds, sum(counters["graph_break"].values()),
                int(counters["stats"]["unique_graphs"]))

    @classmethod
    def since(cls, start: tuple[float, int, int]) -> "CompileStats":
        now = cls._now()
        return cls(now[0] - start[0], now[1] - start[1], now[2] - start[2])


def snapshot() -> tuple[float, int, int]:
    return CompileStats._now()


def heads_per_block(model) -> list[int]:
    """Attention heads each block of this rank holds (AutoTP shards them, unevenly)."""
    from transformers.pytorch_utils import Conv1D

    head_dim = model.config.n_embd // model.config.n_head
    out = []
    for block in model.transformer.h:
        layer = block.attn.c_attn  # Conv1D weight (d, 3*heads*hd); AutoTP's linear (3*heads*hd, d)
        width = layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]
        out.append(width // 3 // head_dim)
    return out


def static_cache(config, heads: list[int], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, layers=None):
    """A `transformers.StaticCache` allocated now (not lazily inside a compiled region) for
    the given block indices (default all; a pipeline stage allocates its own blocks only),
    `heads[i]` heads in block i, with addresses CUDA graphs may keep.

    The addresses are marked static but not guarded: one compiled graph then serves several
    caches of the same shape (a pipeline stage keeps one per micro-batch), and CUDA graph
    trees record one graph per cache instead of dynamo recompiling per cache."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=max_len)
    head_dim = config.n_embd // config.n_head
    for idx in (range(len(heads)) if layers is None else layers):
        fake = torch.zeros((batch, heads[idx], 0, head_dim), dtype=dtype, device=device)
        layer = cache.layers[idx]
        layer.lazy_initialization(fake, fake)
        for t in (layer.keys, layer.values, layer.cumulative_length):
            torch._dynamo.mark_static_address(t, guard=False)
    return cache


def static_counter(device: torch.device) -> torch.Tensor:
    """A device scalar a compiled graph may update in place (a stage's next position)."""
    t = torch.zeros((), dtype=torch.long, device=device)
    torch._dynamo.mark_static_address(t, guard=False)
    return t


def timed_warmup(fn, calls: int = WARMUP_CALLS) -> float:
    """Wall seconds of `calls` untimed calls of `fn` (compilation and graph recording)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start
