"""Timed greedy generation on one rank: warm-up, then iterations over this replica's batches.

Every timed region starts and ends with a device synchronisation (`sync`), and every batch
starts after a barrier across all ranks, so replicas move together and a slow rank shows
up in everyone's wall time. TTFT is the prefill (first token), TPOT each later decode step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class BatchTiming:
    ttft_s: float
    tpot_s: list[float]
    e2e_s: float
    # TTFT of each group of sequences whose first tokens appear apart (the micro-batches of
    # the in-flight pipeline schedule); None: the whole batch's tokens appear together
    ttft_groups_s: list[float] | None = None

    @property
    def ttfts_s(self) -> list[float]:
        return self.ttft_groups_s or [self.ttft_s]


@dataclass
class RankTiming:
    batches: list[BatchTiming] = field(default_factory=list)
    iteration_wall_s: list[float] = field(default_factory=list)
    iteration_tokens: list[int] = field(default_factory=list)
    decode_input_lens: set = field(default_factory=set)

    @property
    def timed_wall_s(self) -> float:
        return sum(self.iteration_wall_s)

    @property
    def generated_tokens(self) -> int:
        return sum(self.iteration_tokens)


def no_sync():
    pass


def generate_batch(gen, ids: torch.Tensor, output_len: int, clock: Callable = time.perf_counter,
                   sync: Callable = no_sync, hook: Callable = lambda point: None,
                   decode_input_lens: set | None = None):
    """Exactly `output_len` greedy tokens per sequence (EOS ignored): 1 prefill + n-1 decodes.

    Returns (tokens (B, output_len), [last-position logits per step or None], BatchTiming).
    A generator that runs its own loop (Hugging Face `generate`, the in-flight pipeline
    schedule) times itself through `generate_timed` with the same clock and sync.
    """
    if hasattr(gen, "generate_timed"):
        tokens, logits, timing = gen.generate_timed(ids, output_len, clock, sync, hook)
        if decode_input_lens is not None and output_len > 1:
            decode_input_lens.add(1)
        return tokens, logits, timing
    hook("prefill")
    sync()
    start = clock()
    step = gen.prefill(ids)
    sync()
    first = prev = clock()
    tokens, logits, tpot = [step.tokens], [step.logits], []
    for _ in range(output_len - 1):
        hook("decode")
        step = gen.decode(step.tokens)
        sync()
        now = clock()
        tpot.append(now - prev)
        prev = now
        tokens.append(step.tokens)
        logits.append(step.logits)
        if decode_input_lens is not None:
            decode_input_lens.add(step.input_len)
    return torch.stack(tokens, dim=1), logits, BatchTiming(first - start, tpot, prev - start)


def run_timed(gen, batches: list[torch.Tensor], output_len: int, iterations: int, warmup: int,
              barrier: Callable, clock: Callable = time.perf_counter, sync: Callable = no_sync,
              hook: Callable = lambda point: None,
              keep_going: Callable[[RankTiming], bool] | None = None) -> RankTiming:
    """Warm-up, then `iterations` timed passes over `batches`, then more passes while
    `keep_going(timing)` says so (asked after each pass from the last of `iterations` on;
    on several ranks it must be collective, so that every rank runs as many passes)."""
    for i in range(warmup):
        generate_batch(gen, batches[i % len(batches)], output_len)
    timing = RankTiming()
    while (len(timing.iteration_wall_s) < iterations
           or (keep_going is not None and keep_going(timing))):
        barrier()
        sync()
        start = clock()
        tokens = 0
        for ids in batches:
            barrier()
            out, _, bt = generate_batch(gen, ids, output_len, clock, sync, hook,
                                        timing.decode_input_lens)
            timing.batches.append(bt)
            tokens += out.numel()
        sync()
        timing.iteration_wall_s.append(clock() - start)
        timing.iteration_tokens.append(tokens)
    return timing
