"""What a run measures besides tokens: wall time, peak memory, GPU busy time, communication time.

Each tracker works on CPU and on CUDA and says what it measured (`kind`, or a reason when it
could not measure): an unknown is None with a reason, never a made-up number.
`comm` imports DeepSpeed only when a tracker is entered, so importing this package stays cheap.
"""

from gptbench.trackers.comm import CommTracker
from gptbench.trackers.gpu_util import GpuUtilSampler, physical_gpu_id
from gptbench.trackers.memory import MemoryTracker
from gptbench.trackers.timing import Clock, Timer, synchronize

__all__ = [
    "Clock", "CommTracker", "GpuUtilSampler", "MemoryTracker", "Timer", "physical_gpu_id",
    "synchronize",
]
