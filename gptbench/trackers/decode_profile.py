"""Where a decode step's time goes, on CUDA: one short profiled window after the timed region.

A few decode steps under torch.profiler give the kernels each step launches, the GPU's busy
time per step (the union of kernel intervals: overlapping kernels counted once) and the host
time per call. With the step's measured time and its floor (the bytes it must read at the
card's bandwidth, gptbench/roofline.py) they say what bounds the row:

- bandwidth-bound: the step is within 2x of its floor and the GPU is busy most of it;
- kernel-bound: the GPU is busy most of the step but far above the floor (too many or
  poorly fused kernels);
- host-bound: the GPU idles between kernels (launch or Python overhead).

On the CPU there is no separate device to be busy or idle: null, with the reason.
"""
from __future__ import annotations

import time

import torch

STEPS = 8          # decode steps in the profiled window
BUSY_FRACTION = 0.8  # the GPU busy this much of a step: not host-bound
NEAR_FLOOR = 2.0   # within this factor of the floor: bandwidth-bound


def busy_s(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals, in their unit."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def verdict(step_s: float, busy_per_step_s: float, floor_s: float | None) -> str:
    if step_s <= 0 or busy_per_step_s < BUSY_FRACTION * step_s:
        return "host-bound"
    if floor_s and step_s <= NEAR_FLOOR * floor_s:
        return "bandwidth-bound"
    return "kernel-bound"


def summarise(kernels: list[tuple[float, float]], steps: int, wall_s: float,
              host_s: float, floor_s: float | None, step_s: float | None = None) -> dict:
    """The record's `metrics.decode_profile` from `kernels` (start, end) seconds of a window
    of `steps` decode steps that took `wall_s` (device drained) and `host_s` of host time
    inside the step calls. `step_s`: the step's time measured without the profiler (the
    timed TPOT p50), which the profiler's own overhead would inflate; the window's otherwise."""
    step_s = step_s or wall_s / steps
    busy = busy_s(kernels) / steps
    return {"steps": steps, "kernels_per_step": len(kernels) / steps,
            "busy_ms_per_step": 1e3 * busy, "host_ms_per_step": 1e3 * host_s / steps,
            "step_ms": 1e3 * step_s, "busy_fraction": busy / step_s if step_s else None,
            "floor_ms": 1e3 * floor_s if floor_s else None,
            "fraction_of_floor": floor_s / step_s if floor_s and step_s else None,
            "verdict": verdict(step_s, busy, floor_s)}


def profile(gen, ids: torch.Tensor, device: torch.device, floor_s: float | None,
            step_s: float | None = None, steps: int = STEPS) -> tuple[dict | None, str | None]:
    """(metrics.decode_profile, None) of `steps` decode steps of `gen` after a prefill of
    `ids`, or (None, reason). Generators that run their own loop (the in-flight pipeline,
    Hugging Face `generate`) have no single step to profile."""
    if device.type != "cuda":
        return None, "decode profile: CUDA only (on the CPU the host is the device)"
    if hasattr(gen, "generate_timed"):
        return None, "decode profile: this generator runs its own loop (no single step to profile)"
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = gen.prefill(ids)
    torch.cuda.synchronize(device)
    host = 0.0
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            out = gen.decode(out.tokens)
            host += time.perf_counter() - t0
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    kernels = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events()
               if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return summarise(kernels, steps, wall, host, floor_s, step_s), None
