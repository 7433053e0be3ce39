"""Energy of one rank's GPU over the timed region, from NVML's total-energy counter.

`nvmlDeviceGetTotalEnergyConsumption` is the millijoules the GPU drew since the driver was
loaded (Volta and later; older GPUs answer NOT_SUPPORTED). Two reads around the timed
passes give its joules; the counter is the whole board's, so another process on the same
GPU adds to it. The counter is updated every few tens of milliseconds: a timed region of a
fraction of a second is coarse (workload.min_duration_s lengthens it).
Without a GPU (CPU runs) or without the counter the result is None with the reason.
"""
from __future__ import annotations

import os
import time

import pynvml

from gptbench.errors import UserError
from gptbench.trackers.gpu_util import no_nvml_reason, nvml_handle, physical_gpu_id


def meter_for(device) -> "EnergyMeter":
    """The meter of the one GPU this rank runs on; a CPU run reads none."""
    if device.type != "cuda":
        return EnergyMeter(None, no_gpu_reason=f"this run uses no GPU (device: {device.type}): "
                                               "NVML's energy counter is a GPU's")
    return EnergyMeter(device.index or 0)


class EnergyMeter:
    """`start()` ... `stop()`, then `result()` -> ({joules, seconds, gpu}, None) or
    (None, reason). `nvml` is the pynvml module (a test passes a stand-in counter) and
    `handle_of` finds the device handle of a physical GPU id."""

    def __init__(self, device_index: int | None, nvml=pynvml, handle_of=nvml_handle,
                 clock=time.perf_counter, no_gpu_reason: str | None = None):
        self.device_index = device_index
        self.nvml, self.handle_of, self.clock = nvml, handle_of, clock
        self.reason = no_gpu_reason if device_index is None else None
        self.gpu: int | str | None = None
        self._handle = None
        self._start: tuple[float, int] | None = None
        self._joules: float | None = None
        self._seconds: float | None = None

    def _read_mj(self) -> int:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def start(self) -> None:
        if self.reason is not None:
            return
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as error:
            self.reason = no_nvml_reason(error)
            return
        try:
            self.gpu = physical_gpu_id(self.device_index, os.environ.get("CUDA_VISIBLE_DEVICES"))
            self._handle = self.handle_of(self.gpu)
            self._start = (self.clock(), self._read_mj())
        except self.nvml.NVMLError_NotSupported:
            self.reason = (f"GPU {self.device_index} has no total-energy counter "
                           "(nvmlDeviceGetTotalEnergyConsumption: not supported; Volta or later)")
            self.nvml.nvmlShutdown()
        except (self.nvml.NVMLError, UserError) as error:
            self.reason = f"cannot read the energy counter of GPU {self.device_index}: {error}"
            self.nvml.nvmlShutdown()

    def stop(self) -> None:
        if self._start is None:
            return
        try:
            end_mj = self._read_mj()
            self._seconds = self.clock() - self._start[0]
            # mJ; a counter that went backwards (driver reloaded) says nothing
            if end_mj < self._start[1]:
                self.reason = "the energy counter went backwards (driver reloaded?)"
            else:
                self._joules = (end_mj - self._start[1]) / 1e3
        except self.nvml.NVMLError as error:
            self.reason = f"energy counter read failed at the end of the timed region: {error}"
        finally:
            self._start = None
            self.nvml.nvmlShutdown()

    def result(self) -> tuple[dict | None, str | None]:
        if self.reason is not None:
            return None, self.reason
        if self._joules is None:
            return None, "the energy meter was not started"
        return {"joules": self._joules, "seconds": self._seconds, "gpu": str(self.gpu)}, None


def energy_block(ranks: list[dict], generated_tokens: int) -> tuple[dict | None, str | None]:
    """The record's `metrics.energy` from every rank's reading (`energy` / `energy_reason`):
    joules summed over the GPUs (a GPU shared by two ranks counted once), average watts
    summed over them (each GPU's joules over its own timed window), joules per generated
    token of the configuration. (None, the first rank's reason) when any GPU has none."""
    missing = next((r.get("energy_reason") for r in ranks if not r.get("energy")), None)
    if missing is not None or not ranks:
        return None, missing or "no rank measured energy"
    by_gpu = {}
    for r in ranks:
        by_gpu.setdefault((r.get("host"), r["energy"]["gpu"]), r["energy"])
    joules = sum(e["joules"] for e in by_gpu.values())
    watts = sum(e["joules"] / e["seconds"] for e in by_gpu.values() if e["seconds"] > 0)
    return {"joules": joules, "average_watts": watts,
            "joules_per_token": joules / generated_tokens if generated_tokens else None,
            "per_rank_joules": [r["energy"]["joules"] for r in ranks], "gpus": len(by_gpu),
            "source": "NVML nvmlDeviceGetTotalEnergyConsumption read before the first and "
                      "after the last timed pass on each rank's GPU; summed over GPUs"}, None
