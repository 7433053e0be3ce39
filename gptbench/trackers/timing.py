"""Wall-clock timing of a region, with the device drained on both sides.

CUDA kernels run asynchronously: without a synchronize before reading the clock we would
time the kernel launches, not the work (nanoGPT's bench.py does the same).
"""

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

import torch


class Clock(Protocol):
    """Returns seconds from an arbitrary origin; only differences are used."""

    def __call__(self) -> float: ...


def synchronize(device: torch.device) -> None:
    """Wait until all queued work on `device` is done (CPU work is already synchronous).

    Skipped while a CUDA graph is being captured, where synchronising is an error; work
    replayed from a graph is invisible to host-side timers anyway.
    """
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize(device)


class Timer:
    """Appends the seconds each `measure()` block took to `elapsed_s`."""

    def __init__(self, device: torch.device, clock: Clock = time.perf_counter):
        self.device = device
        self.clock = clock
        self.elapsed_s: list[float] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        synchronize(self.device)
        start_s = self.clock()
        yield
        synchronize(self.device)
        self.elapsed_s.append(self.clock() - start_s)
