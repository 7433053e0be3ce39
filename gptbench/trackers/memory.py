"""Peak memory of this rank over a region.

CUDA: the caching allocator's own counters (`max_memory_allocated`, plus what it reserved
from the driver), exact, reset at `reset()`; beside them what the whole device holds
(`device_used_bytes`), since NCCL's buffers are outside the allocator.
CPU: there is no allocator counter, so we report the process's resident set size (RSS),
which also counts the interpreter, libraries and model weights. `ru_maxrss` alone is the
peak over the process's whole life (model loading usually dominates it), so a thread samples
RSS every `interval_s` between `reset()` and `stop()`; if `ru_maxrss` rose inside the window,
the lifetime peak happened there and is taken as exact. A spike shorter than `interval_s`
that does not set a new lifetime peak can be missed.
"""

import resource
import sys

import psutil
import torch

from gptbench.trackers.sampler import PeriodicSampler

# Linux reports ru_maxrss in KiB, macOS in bytes (getrusage(2) on each).
_RU_MAXRSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024


def _lifetime_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RU_MAXRSS_UNIT_BYTES


class MemoryTracker:
    """`reset()` before the timed region, `stop()` after it, then read `peak_bytes()`."""

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device = device
        self.interval_s = interval_s
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self.baseline_bytes = 0
        self._process = psutil.Process()
        self._sampled_peak_bytes = 0
        self._lifetime_peak_at_reset_bytes = 0
        self._lifetime_peak_at_stop_bytes = 0
        self._sampler = PeriodicSampler(self._record_sample, interval_s, "gptbench-rss")

    def reset(self) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return
        self.stop()
        self.baseline_bytes = self._process.memory_info().rss
        self._sampled_peak_bytes = self.baseline_bytes
        self._lifetime_peak_at_reset_bytes = _lifetime_peak_rss_bytes()
        self._lifetime_peak_at_stop_bytes = self._lifetime_peak_at_reset_bytes
        self._sampler.start()

    def stop(self) -> None:
        """End the window (CPU); a no-op on CUDA, whose counters keep their peak."""
        if self._sampler.stop():
            self._lifetime_peak_at_stop_bytes = _lifetime_peak_rss_bytes()

    def peak_bytes(self) -> int:
        """Highest memory in the window, in bytes; on CPU this ends the window if still open."""
        if self.kind == "cuda_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self._sampler.running:
            self.stop()
        if self._lifetime_peak_at_stop_bytes > self._lifetime_peak_at_reset_bytes:
            return max(self._sampled_peak_bytes, self._lifetime_peak_at_stop_bytes)
        return self._sampled_peak_bytes

    def peak_reserved_bytes(self) -> int | None:
        """What the CUDA caching allocator held from the driver at its peak; None on CPU."""
        if self.kind == "cuda_allocated":
            return torch.cuda.max_memory_reserved(self.device)
        return None

    def device_used_bytes(self) -> int | None:
        """What the whole CUDA device holds now (total - free, torch.cuda.mem_get_info):
        also NCCL's buffers, the CUDA context and other processes, which the allocator's
        counters miss; None on CPU."""
        if self.kind != "cuda_allocated":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _record_sample(self) -> None:
        self._sampled_peak_bytes = max(self._sampled_peak_bytes, self._process.memory_info().rss)
