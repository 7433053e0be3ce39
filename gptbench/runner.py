"""Timed greedy generation on one rank: warm-up, then iterations over this replica's batches.

Every generator is timed the same way (trackers/timing.py `Stamps`): on CUDA an event after
every step, read after the batch with one synchronisation; on CPU the host clock. Every
batch starts after a barrier across all ranks, so replicas move together and a slow rank
shows up in everyone's wall time. TTFT is the prefill (first token), TPOT each later step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gptbench.trackers.timing import Stamps, synchronize


@dataclass
class BatchTiming:
    ttft_s: float
    tpot_s: list[float]
    e2e_s: float
    # TTFT of each group of sequences whose first tokens appear apart (the micro-batches of
    # the in-flight pipeline schedule); None: the whole batch's tokens appear together
    ttft_groups_s: list[float] | None = None
    marks_s: list[float] | None = None  # seconds from the batch's start to each step's end

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


def generate_batch(gen, ids: torch.Tensor, output_len: int, stamps: Stamps | None = None,
                   hook: Callable = lambda point: None, decode_input_lens: set | None = None):
    """Exactly `output_len` greedy tokens per sequence (EOS ignored): 1 prefill + n-1 decodes.

    Returns (tokens (B, output_len), [last-position logits per step or None], BatchTiming).
    `stamps` takes the time at the start and after every step (default: CUDA events read
    after the batch on GPUs, the host clock on CPU; trackers/timing.py). A generator that
    runs its own loop (Hugging Face `generate`, the in-flight pipeline schedule) takes its
    marks through `generate_timed` with the same stamps.
    """
    stamps = stamps or Stamps(ids.device)
    if hasattr(gen, "generate_timed"):
        tokens, logits, timing = gen.generate_timed(ids, output_len, stamps, hook)
        if decode_input_lens is not None and output_len > 1:
            decode_input_lens.add(1)
        return tokens, logits, timing
    hook("prefill")
    start = stamps.mark()
    step = gen.prefill(ids)
    marks = [stamps.mark()]
    tokens, logits = [step.tokens], [step.logits]
    for _ in range(output_len - 1):
        hook("decode")
        step = gen.decode(step.tokens)
        marks.append(stamps.mark())
        tokens.append(step.tokens)
        logits.append(step.logits)
        if decode_input_lens is not None:
            decode_input_lens.add(step.input_len)
    seconds = stamps.seconds(start, marks)
    tpot = [b - a for a, b in zip(seconds, seconds[1:])]
    return (torch.stack(tokens, dim=1), logits,
            BatchTiming(seconds[0], tpot, seconds[-1], marks_s=seconds))


def run_timed(gen, batches: list[torch.Tensor], output_len: int, iterations: int, warmup: int,
              barrier: Callable, device: torch.device | None = None,
              clock: Callable = time.perf_counter, hook: Callable = lambda point: None,
              sync: Callable | None = None,
              keep_going: Callable[[RankTiming], bool] | None = None) -> RankTiming:
    """Warm-up batches, then `iterations` passes over `batches`, each batch after a barrier;
    an iteration's wall time from the host clock with the device drained on both sides.
    More passes follow while `keep_going(timing)` says so (asked after each pass from the
    last of `iterations` on; on several ranks it must be collective, so that every rank
    runs as many passes)."""
    device = device or batches[0].device
    sync = sync or (lambda: synchronize(device))
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
            stamps = Stamps(device, clock=clock, sync=sync)
            out, _, bt = generate_batch(gen, ids, output_len, stamps, hook,
                                        timing.decode_input_lens)
            timing.batches.append(bt)
            tokens += out.numel()
        sync()
        timing.iteration_wall_s.append(clock() - start)
        timing.iteration_tokens.append(tokens)
    return timing
