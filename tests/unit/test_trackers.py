"""Trackers against physical ground truth: sleeps, known allocations, real collectives."""

import socket
import sys
import time
import types

import pytest
import torch
import torch.distributed

from gptbench.errors import UserError
from gptbench.trackers.comm import DEFAULT_TARGETS, CommTracker
from gptbench.trackers.gpu_util import (
    GpuUtilSampler,
    nvml_gpu_count,
    physical_gpu_id,
    visible_gpu_ids,
)
from gptbench.trackers.memory import MemoryTracker
from gptbench.trackers.timing import Timer

CPU = torch.device("cpu")
ALLOCATION_BYTES = 400 * 10**6


# --- timing -----------------------------------------------------------------------------

def test_timer_records_clock_difference_per_block():
    readings = iter([10.0, 10.25, 20.0, 21.0])
    timer = Timer(CPU, clock=lambda: next(readings))
    with timer.measure():
        pass
    with timer.measure():
        pass
    assert timer.elapsed_s == [0.25, 1.0]


def test_timer_measures_a_real_sleep_within_10_percent():
    timer = Timer(CPU)
    with timer.measure():
        time.sleep(0.2)
    assert timer.elapsed_s == [pytest.approx(0.2, rel=0.1)]


def test_timer_records_nothing_for_a_block_that_raised():
    timer = Timer(CPU)
    with pytest.raises(ValueError), timer.measure():
        raise ValueError
    assert timer.elapsed_s == []


# --- memory -----------------------------------------------------------------------------

def test_cpu_peak_rss_grows_by_a_held_allocation():
    tracker = MemoryTracker(CPU)
    tracker.reset()
    tensor = torch.empty(ALLOCATION_BYTES // 4, dtype=torch.float32).fill_(1.0)  # touch pages
    time.sleep(0.05)
    tracker.stop()
    del tensor
    assert tracker.kind == "rss"
    assert tracker.peak_reserved_bytes() is None and tracker.device_used_bytes() is None
    assert tracker.peak_bytes() - tracker.baseline_bytes == pytest.approx(ALLOCATION_BYTES, rel=0.1)


def test_cpu_peak_rss_keeps_an_allocation_freed_before_stop():
    tracker = MemoryTracker(CPU)
    tracker.reset()
    tensor = torch.empty(ALLOCATION_BYTES // 4, dtype=torch.float32).fill_(1.0)
    time.sleep(0.1)
    del tensor
    time.sleep(0.05)
    tracker.stop()
    assert tracker.peak_bytes() - tracker.baseline_bytes == pytest.approx(ALLOCATION_BYTES, rel=0.1)


def test_cpu_peak_rss_ignores_peaks_before_reset():
    before = torch.empty(ALLOCATION_BYTES // 4, dtype=torch.float32).fill_(1.0)
    del before  # the process's lifetime peak (ru_maxrss) now lies before the window
    tracker = MemoryTracker(CPU)
    tracker.reset()
    time.sleep(0.05)
    tracker.stop()
    assert tracker.peak_bytes() - tracker.baseline_bytes < ALLOCATION_BYTES // 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_allocated_grows_by_a_known_allocation():
    device = torch.device("cuda", 0)
    tracker = MemoryTracker(device)
    tracker.reset()
    tensor = torch.ones(ALLOCATION_BYTES // 4, dtype=torch.float32, device=device)
    del tensor
    assert tracker.kind == "cuda_allocated"
    assert tracker.peak_bytes() - tracker.baseline_bytes == pytest.approx(ALLOCATION_BYTES, rel=0.1)
    assert tracker.peak_reserved_bytes() >= tracker.peak_bytes()
    assert tracker.device_used_bytes() >= tracker.peak_reserved_bytes()  # context on top


# --- GPU utilisation --------------------------------------------------------------------

@pytest.mark.skipif(nvml_gpu_count() > 0, reason="this machine has an NVIDIA driver")
def test_gpu_util_without_driver_is_none_with_reason():
    with GpuUtilSampler(0, interval_s=0.01) as sampler:
        time.sleep(0.05)
    value, reason = sampler.result()
    assert value is None
    assert reason.startswith("no NVIDIA driver:")
    assert sampler.sample_count == 0


def test_a_cpu_run_samples_no_gpu_and_says_why(monkeypatch):
    """A CPU run on a machine with GPUs must not report GPU 0's utilisation: NVML is never
    asked (its init fails the test), and the reason names the run's device."""
    import pynvml

    from gptbench import measure
    from gptbench.trackers import gpu_util

    def forbidden(*args):
        raise AssertionError("NVML was asked about a GPU this run does not use")

    monkeypatch.setattr(pynvml, "nvmlInit", forbidden)
    sampler = gpu_util.sampler_for(torch.device("cpu"))
    with sampler:
        time.sleep(0.01)
    assert sampler.result() == (None, "this run uses no GPU (device: cpu)")
    assert measure.sampler_for is gpu_util.sampler_for  # the sampler the runs use


@pytest.mark.skipif(not torch.cuda.is_available() or nvml_gpu_count() == 0,
                    reason="needs a CUDA GPU and NVML")
def test_the_sampler_of_a_gpu_run_watches_its_own_device():
    from gptbench.trackers import gpu_util

    device = torch.device("cuda", torch.cuda.device_count() - 1)
    assert gpu_util.sampler_for(device).device_index == device.index


@pytest.mark.skipif(not torch.cuda.is_available() or nvml_gpu_count() == 0,
                    reason="needs a CUDA GPU and NVML")
def test_gpu_util_of_a_busy_gpu_is_high():
    device = torch.device("cuda", 0)
    matrix = torch.randn(4096, 4096, device=device)
    with GpuUtilSampler(0, interval_s=0.05) as sampler:
        deadline_s = time.perf_counter() + 1.0
        while time.perf_counter() < deadline_s:
            matrix = (matrix @ matrix).clamp_(-1, 1)
            torch.cuda.synchronize(device)
    value, reason = sampler.result()
    assert reason is None
    assert sampler.sample_count >= 10
    assert value > 50


@pytest.mark.parametrize("visible, local_index, expected", [
    (None, 1, 1),
    ("2,3", 1, 3),
    ("2, 3", 0, 2),
    ("1gpu,2", 1, 2),  # CUDA reads entries like strtoul
    ("GPU-aaaa-1111,GPU-bbbb", 1, "GPU-bbbb"),
    ("MIG-cccc", 0, "MIG-cccc"),
])
def test_physical_gpu_id_follows_cuda_visible_devices(visible, local_index, expected):
    assert physical_gpu_id(local_index, visible) == expected


@pytest.mark.parametrize("visible, expected", [
    ("", []),
    ("0,-1,2", [0]),  # the first malformed entry ends the list
    ("GPU-aaaa,3", ["GPU-aaaa"]),
    ("0,1,0", []),  # a repeated entry hides every GPU
])
def test_visible_gpu_ids_edge_cases(visible, expected):
    assert visible_gpu_ids(visible) == expected


def test_physical_gpu_id_of_an_invisible_rank_names_the_variable():
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES='2,3' exposes 2"):
        physical_gpu_id(2, "2,3")


# --- communication ----------------------------------------------------------------------

def _sleep_200ms() -> str:
    time.sleep(0.2)
    return "done"


def test_wrap_accounts_a_sleeping_call_within_10_percent_and_restores():
    target = types.ModuleType("fake_comm")
    target.op = _sleep_200ms
    tracker = CommTracker(CPU)
    with tracker.wrap(target, "op"):
        assert target.op() == "done"
    assert target.op is _sleep_200ms
    assert tracker.calls == 1
    assert tracker.by_op["fake_comm.op"].seconds == pytest.approx(0.2, rel=0.1)
    assert tracker.seconds_total == pytest.approx(0.2, rel=0.1)


def test_wrap_counts_nested_tracked_calls_once():
    target = types.ModuleType("fake_comm")
    target.inner = _sleep_200ms
    target.outer = lambda: target.inner()
    tracker = CommTracker(CPU)
    with tracker.wrap(target, "outer"), tracker.wrap(target, "inner"):
        target.outer()
    assert list(tracker.by_op) == ["fake_comm.outer"]
    assert tracker.calls == 1


@pytest.fixture(scope="module")
def gloo_world_of_one():
    import deepspeed
    import deepspeed.comm
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    with pytest.MonkeyPatch.context() as patch:
        # DeepSpeed's CPU shm all-reduce is a 30 s g++ build and ignores process groups.
        patch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
        deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed.comm
    torch.distributed.destroy_process_group()


def test_comm_tracker_counts_deepspeed_and_torch_collectives(gloo_world_of_one):
    dist = gloo_world_of_one
    tensor = torch.ones(1024)
    with CommTracker(CPU) as tracker:
        dist.all_reduce(tensor)
        dist.all_reduce(tensor)
        dist.inference_all_reduce(tensor)  # what AutoTP's LinearAllreduce calls
        torch.distributed.broadcast(tensor, src=0)
    assert torch.equal(tensor, torch.ones(1024))  # a world of one reduces to itself
    assert {name: stats.calls for name, stats in tracker.by_op.items()} == {
        "deepspeed.comm.all_reduce": 2,  # its inner torch.distributed.all_reduce not again
        "deepspeed.comm.inference_all_reduce": 1,
        "torch.distributed.broadcast": 1,
    }
    assert tracker.calls == 4
    assert 0 < tracker.seconds_total < 1


def test_comm_tracker_patches_every_target_and_restores_it(gloo_world_of_one):
    import importlib
    modules = {name: importlib.import_module(name) for name, _ in DEFAULT_TARGETS}
    originals = {(name, attr): getattr(modules[name], attr) for name, attr in DEFAULT_TARGETS}
    with CommTracker(CPU):
        for (name, attr), original in originals.items():
            assert getattr(modules[name], attr) is not original, f"{name}.{attr} not patched"
    for (name, attr), original in originals.items():
        assert getattr(modules[name], attr) is original, f"{name}.{attr} not restored"


def test_comm_tracker_logs_torch_calls_with_their_group(gloo_world_of_one):
    dist = gloo_world_of_one
    tensor = torch.ones(256)
    with CommTracker(CPU, log_calls=True) as tracker:
        dist.all_reduce(tensor)                      # deepspeed.comm -> torch.distributed
        work = torch.distributed.all_reduce(tensor, async_op=True)
        time.sleep(0.05)                             # not blocked: not counted
        work.wait()
        torch.distributed.barrier()
    ops = [(c.op, c.kind, c.group, c.nbytes) for c in tracker.log]
    assert ops == [("all_reduce", "collective", (0,), 1024),
                   ("all_reduce", "collective", (0,), 1024),
                   ("barrier", "collective", (0,), 0)]
    blocking, non_blocking, _ = tracker.log
    assert blocking.start_s == blocking.post_s <= blocking.end_s
    assert non_blocking.start_s - non_blocking.post_s >= 0.05  # waited on only after the sleep
    assert non_blocking.end_s - non_blocking.start_s < 0.05
    assert tracker.by_op["deepspeed.comm.all_reduce"].calls == 1  # outermost still counted once


def test_latency_probe_in_a_world_of_one(gloo_world_of_one):
    from gptbench.trackers import latency

    seconds = latency.probe_group_op("all_reduce", [[0]], 1024, CPU, iterations=5)
    assert 0 < seconds < 0.5
    assert latency.probe_p2p([], 8, CPU, iterations=2) is None  # in no pair


def test_latency_table_interpolates_by_size_and_prefers_the_world_size():
    from gptbench.trackers.latency import LatencyTable

    entries = [{"op": "all_reduce", "group_size": 2, "world_size": 2, "bytes": b, "latency_us": us}
               for b, us in ((4, 100.0), (4096, 400.0))]
    entries += [{"op": "all_reduce", "group_size": 2, "world_size": 4, "bytes": 4, "latency_us": 900.0}]
    table = LatencyTable(entries)
    assert table.lookup_us("all_reduce", 2, 128, world_size=2) == pytest.approx(200.0)  # log-log
    assert table.lookup_us("all_reduce", 2, 1, world_size=2) == 100.0
    assert table.lookup_us("all_reduce", 2, 8192, world_size=2) == pytest.approx(800.0)
    assert table.lookup_us("all_reduce", 2, 4, world_size=4) == 900.0
    assert table.lookup_us("p2p", 2, 4) is None
    assert LatencyTable(fixed_us=7.0).lookup_us("barrier", 4, 0) == 7.0


# --- communication on the device path (CUDA: NCCL Work durations, no syncs) ---------------

class StandInWork:
    """What an NCCL Work offers the tracker: wait() and get_duration() (milliseconds)."""

    def __init__(self, ms: float, log: list):
        self.ms, self.log = ms, log

    def wait(self, *args):
        self.log.append("wait")
        return True

    def get_duration(self) -> float:
        self.log.append("get_duration")
        return self.ms


def stand_in_dist(log: list):
    """A module with torch.distributed's signatures whose operations return StandInWorks;
    the blocking send must never be called on the device path (it would block the host)."""
    fake = types.ModuleType("fake_dist")

    def all_reduce(tensor, op=None, group=None, async_op=False):
        log.append(f"all_reduce async_op={async_op}")
        return StandInWork(0.006, log) if async_op else None

    def isend(tensor, dst=None, group=None, tag=0, group_dst=None):
        log.append(f"isend dst={dst}")
        return StandInWork(0.004, log)

    def send(tensor, dst=None, group=None, tag=0, group_dst=None):
        raise AssertionError("the blocking send was called")

    fake.all_reduce, fake.isend, fake.send = all_reduce, isend, send
    return fake


def test_device_path_times_calls_by_their_work_not_by_syncs(gloo_world_of_one):
    log: list = []
    fake = stand_in_dist(log)
    tracker = CommTracker(CPU, log_calls=True, device_timing=True, dist_module="fake_dist",
                          targets=())
    with tracker, tracker.wrap(fake, "all_reduce"), tracker.wrap(fake, "send"):
        assert fake.all_reduce(torch.ones(4)) is None  # still blocking to its caller
        fake.send(torch.ones(2), dst=0)
        assert log == ["all_reduce async_op=True", "wait", "isend dst=0", "wait"]
    assert log[-2:] == ["get_duration", "get_duration"]  # read after the batch, not inside
    reduce, send = tracker.log
    assert reduce.device_s == pytest.approx(6e-6) and send.device_s == pytest.approx(4e-6)
    assert reduce.end_s - reduce.start_s == pytest.approx(6e-6)
    assert reduce.as_list()[7] == reduce.device_s and send.kind == "send"
    assert tracker.by_op["fake_dist.all_reduce"].seconds == pytest.approx(6e-6)
    assert tracker.method == "nccl_work_duration" and tracker.timing_error is None


def test_device_path_on_gloo_says_why_it_has_no_kernel_times(gloo_world_of_one):
    """gloo's Work has no duration: the call is still made and logged, the reason kept."""
    tensor = torch.ones(8)
    with CommTracker(CPU, log_calls=True, device_timing=True) as tracker:
        torch.distributed.all_reduce(tensor)
    assert torch.equal(tensor, torch.ones(8))
    (call,) = tracker.log
    assert call.device_s is None and tracker.timing_error


def test_the_host_clock_path_stays_on_cpu():
    assert CommTracker(CPU).method == "host_clock_with_device_syncs"
    assert CommTracker(torch.device("cuda", 0)).method == "nccl_work_duration"


def test_latency_is_the_groups_shortest_kernel_where_every_member_has_one():
    """CUDA: each probe iteration's latency is the group's shortest NCCL kernel (the last
    to arrive spins least), not our host span with its launch and sync; where a member has
    no kernel time (gloo, timing off) the host clock's span after the last issue."""
    from gptbench.trackers.latency import after_last_arrival_s, kernel_seconds

    host = [{"host": "h", "ref": 0.0, "spans": [(1.0, 1.5, 37e-6), (2.0, 2.5, 9e-6)]},
            {"host": "h", "ref": 0.0, "spans": [(1.2, 1.5, 7e-6), (2.1, 2.5, 30e-6)]}]
    assert after_last_arrival_s(host, [0, 1], 0) == pytest.approx((7e-6 + 9e-6) / 2)
    no_kernel = [{**e, "spans": [s[:2] + (None,) for s in e["spans"]]} for e in host]
    assert after_last_arrival_s(no_kernel, [0, 1], 0) == pytest.approx((0.3 + 0.4) / 2)
    assert kernel_seconds(None) is None and kernel_seconds(StandInWork(0.006, [])) == 6e-6
