"""The collective watchdog's timeout (`engine.comm_timeout_s`), chosen when set to `auto`.

Every process group gets this timeout; NCCL's watchdog aborts a rank (SIGABRT) whose
collective waits longer. Compilation is what makes ranks arrive far apart: a rank's first
collective after its decode graph is compiled waits for the slowest peer to finish
compiling. So the timeout must exceed the slowest rank's compile time, with ranks compiling
at once on one host sharing its cores: each rank's inductor starts `min(32, cpus)` compile
workers (torch._inductor.config.compile_threads), so L ranks on C cores run their parallel
compile L * min(32, C) / C times slower at worst.

Prediction: seconds per transformer block compiled (a rank compiles its stage's blocks,
prefill and decode graphs), from one measurement per device kind:
- CUDA: one GPT-2 XL rank (48 blocks, reduce-overhead) compiled in 77 s on one H200;
- CPU: the `small` preset (6 blocks) compiled in 9.6-13 s on a 2-core machine.
A measured compile time (e.g. from an earlier record's metrics.compile_s, or the gpu-check
proof of four ranks compiling at once) replaces the prediction when given.
The timeout is MARGIN x the predicted slowest compile, never below BASE_S.
"""
from __future__ import annotations

import math

BASE_S = 120.0  # the former fixed default: enough for loading and an eager first step
MARGIN = 2.0    # prediction error, and whatever else differs between ranks (loading)
COMPILE_S_PER_BLOCK = {"cuda": 77.0 / 48, "cpu": 13.0 / 6}
INDUCTOR_MAX_WORKERS = 32  # torch._inductor.config.compile_threads' cap


def contention(local_ranks: int, cpus: int) -> float:
    """How much slower a rank compiles when `local_ranks` compile at once on `cpus` cores."""
    cpus = max(1, cpus)
    return max(1.0, local_ranks * min(INDUCTOR_MAX_WORKERS, cpus) / cpus)


def choose_comm_timeout(setting, device_type: str, compile_mode: str, n_layer: int, pp: int,
                        local_ranks: int, cpus: int,
                        measured_compile_s: float | None = None) -> tuple[float, str]:
    """(seconds, why) of the watchdog timeout. `setting`: a number (taken as given) or
    "auto"."""
    if setting != "auto":
        return float(setting), "engine.comm_timeout_s set in the config"
    if compile_mode == "off":
        return BASE_S, f"auto: no compilation (engine.compile off), the base {BASE_S:g} s"
    blocks = math.ceil(n_layer / max(1, pp))
    factor = contention(local_ranks, cpus)
    if measured_compile_s is not None:
        single, source = measured_compile_s, f"measured compile {measured_compile_s:.0f} s"
    else:
        per_block = COMPILE_S_PER_BLOCK.get(device_type, COMPILE_S_PER_BLOCK["cpu"])
        single = per_block * blocks
        source = (f"predicted compile {single:.0f} s ({blocks} blocks x {per_block:.2f} s on "
                  f"{device_type})")
    slowest = single * factor
    seconds = max(BASE_S, MARGIN * slowest)
    return seconds, (f"auto: {source}, x{factor:.1f} for {local_ranks} rank(s) compiling at "
                     f"once on {cpus} cores = {slowest:.0f} s; timeout {MARGIN:g} x that, at "
                     f"least {BASE_S:g} s")


def for_plan(plan, measured_compile_s: float | None = None) -> tuple[float, str]:
    """The timeout of a resolved RunPlan on this host."""
    import os

    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE",
                                                            plan.grid.world_size)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return choose_comm_timeout(plan.cfg.engine.comm_timeout_s, plan.device.type,
                               plan.compile_mode, plan.model_dims["n_layer"], plan.grid.pp,
                               local, cpus or 1, measured_compile_s)
