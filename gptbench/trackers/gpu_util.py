"""GPU utilisation of one rank's GPU, sampled from NVML in a background thread.

NVML's `utilization.gpu` is the percentage of the last sample period (1/6 s to 1 s,
depending on the product) during which at least one kernel ran; it is not SM occupancy,
so a GPU running one tiny kernel at a time reads 100%, and so does an NCCL kernel spinning
while it waits for a peer (a pipeline bubble, a straggling tensor rank). The record labels
it `kernel-resident` and nothing ranks runs by it (results.UTIL_SOURCE); the pipeline's
work figure is the stages' busy share. MIG instances report no utilisation.
Without an NVIDIA driver (CPU runs) the result is None with the reason, never an exception.
"""

import os

import pynvml

from gptbench.errors import UserError
from gptbench.trackers.sampler import PeriodicSampler


def nvml_gpu_count() -> int:
    """GPUs NVML sees; 0 without an NVIDIA driver."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def visible_gpu_ids(cuda_visible_devices: str) -> list[int | str]:
    """The physical GPUs a CUDA_VISIBLE_DEVICES value exposes, in CUDA's order.

    CUDA's parsing (mirrored by torch.cuda._parse_visible_devices): a list of `GPU-`/`MIG-`
    UUIDs (unique prefixes allowed) or of integers read like strtoul ("1gpu" is 1); the first
    entry that does not parse ends the list; a repeated entry hides every GPU.
    """
    ids: list[int | str] = []
    prefix = cuda_visible_devices[:4] if cuda_visible_devices.startswith(("GPU-", "MIG-")) else ""
    for raw in cuda_visible_devices.split(","):
        entry = raw.strip()
        if prefix:
            if not entry.startswith(prefix):
                break
            gpu_id: int | str = entry
        else:
            digits = entry[:len(entry) - len(entry.lstrip("0123456789"))]
            if not digits:
                break
            gpu_id = int(digits)
        if gpu_id in ids:
            return []
        ids.append(gpu_id)
    return ids


def physical_gpu_id(local_index: int, cuda_visible_devices: str | None) -> int | str:
    """The GPU that CUDA calls `local_index`, as an NVML index or a UUID (prefix).

    Integer indices equal NVML indices only when CUDA_DEVICE_ORDER=PCI_BUS_ID or all GPUs
    are the same model (CUDA's default order is fastest first, NVML's is PCI bus order).
    """
    if cuda_visible_devices is None:
        return local_index
    ids = visible_gpu_ids(cuda_visible_devices)
    if not 0 <= local_index < len(ids):
        raise UserError(
            f"local GPU index {local_index} is not visible: "
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} exposes {len(ids)} GPU(s)")
    return ids[local_index]


def nvml_handle(physical_id: int | str):
    """An NVML device handle for an index or a (possibly shortened) UUID; needs nvmlInit()."""
    if isinstance(physical_id, int):
        return pynvml.nvmlDeviceGetHandleByIndex(physical_id)
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(physical_id)
    except pynvml.NVMLError_NotFound:
        pass  # CUDA accepts a unique UUID prefix, NVML only the full UUID
    matches = [
        handle for handle in map(pynvml.nvmlDeviceGetHandleByIndex,
                                 range(pynvml.nvmlDeviceGetCount()))
        if pynvml.nvmlDeviceGetUUID(handle).startswith(physical_id)
    ]
    if len(matches) != 1:
        raise UserError(f"CUDA_VISIBLE_DEVICES entry {physical_id!r} matches "
                        f"{len(matches)} GPUs, expected exactly 1")
    return matches[0]


def no_nvml_reason(error: pynvml.NVMLError) -> str:
    if isinstance(error, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)):
        return f"no NVIDIA driver: {error}"
    return f"NVML failed: {error}"


def sampler_for(device) -> "GpuUtilSampler":
    """The sampler of the one GPU this rank runs on; a CPU run samples no GPU at all (a
    machine's GPU 0 says nothing about a run that does not use it)."""
    if device.type != "cuda":
        return GpuUtilSampler(None, no_gpu_reason=f"this run uses no GPU (device: {device.type})")
    return GpuUtilSampler(device.index or 0)


class GpuUtilSampler:
    """`start()` ... `stop()` (or `with`), then `result()` -> (mean %, None) or (None, reason).

    `device_index=None` samples nothing: `result()` gives `no_gpu_reason`."""

    def __init__(self, device_index: int | None, interval_s: float = 0.1,
                 no_gpu_reason: str | None = None):
        self.device_index = device_index
        self.interval_s = interval_s
        self.no_gpu_reason = no_gpu_reason or "no GPU to sample"
        self.samples_pct: list[int] = []
        self.reason: str | None = None
        self._handle = None
        self._sampler = PeriodicSampler(self._read, interval_s, "gptbench-nvml")

    @property
    def sample_count(self) -> int:
        return len(self.samples_pct)

    def start(self) -> None:
        self.samples_pct.clear()
        self.reason = None
        if self.device_index is None:
            self.reason = self.no_gpu_reason
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            self.reason = no_nvml_reason(error)
            return
        try:
            self._handle = nvml_handle(
                physical_gpu_id(self.device_index, os.environ.get("CUDA_VISIBLE_DEVICES")))
            pynvml.nvmlDeviceGetUtilizationRates(self._handle)
        except (pynvml.NVMLError, UserError) as error:
            self.reason = f"cannot read utilisation of GPU {self.device_index}: {error}"
            pynvml.nvmlShutdown()
            return
        self._sampler.start()

    def stop(self) -> None:
        # The counter covers the last NVML period, so the sampler's read at stop sees the
        # window's end even when the window is shorter than interval_s.
        if self._sampler.stop():
            pynvml.nvmlShutdown()

    def result(self) -> tuple[float | None, str | None]:
        if self.reason is not None:
            return None, self.reason
        if not self.samples_pct:
            return None, "no samples: the sampler was not started"
        return sum(self.samples_pct) / len(self.samples_pct), None

    def __enter__(self) -> "GpuUtilSampler":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _read(self) -> None:
        try:
            self.samples_pct.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except pynvml.NVMLError as error:
            self.reason = f"utilisation read failed mid-run: {error}"
