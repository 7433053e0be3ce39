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


def cuda_event():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class Stamps:
    """When the steps of one batch end, taken the same way for every generator.

    On CUDA: an event recorded after each step and read after the batch, with one
    synchronisation per batch: the host never waits inside the decode loop, so each step's
    host work overlaps the device's (what a serving loop does). On the CPU, where work is
    synchronous, and in `host` mode (the profiled batch, which needs host clock readings to
    align with its collectives): the host clock after a device synchronisation; every
    reading is kept in `readings`. `event` (a callable returning a recorded event with
    `elapsed_time(other)` in ms) and `sync` are seams for tests."""

    def __init__(self, device: torch.device, host: bool | None = None,
                 clock: Clock = time.perf_counter, event=cuda_event, sync=None):
        self.device = device
        self.host = device.type != "cuda" if host is None else host
        self.clock, self.event = clock, event
        self.sync = sync or (lambda: synchronize(device))
        self.readings: list[float] = []

    def mark(self):
        if self.host:
            self.sync()
            self.readings.append(self.clock())
            return self.readings[-1]
        return self.event()

    def seconds(self, start, marks: list) -> list[float]:
        """Seconds from `start` to each of `marks` (all taken by `mark`)."""
        if self.host:
            return [t - start for t in marks]
        self.sync()
        return [start.elapsed_time(e) / 1e3 for e in marks]
