"""The decode profile's arithmetic (trackers/decode_profile.py): busy time as the union of
kernel intervals, per-step figures and the verdict; on the CPU it is null with its reason."""
import pytest
import torch

from gptbench.trackers import decode_profile as dp


def test_busy_time_counts_overlapping_kernels_once():
    assert dp.busy_s([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert dp.busy_s([]) == 0


@pytest.mark.parametrize("step,busy,floor,expected", [
    (1.0, 0.5, 0.6, "host-bound"),        # the GPU idles half the step
    (1.0, 0.95, 0.6, "bandwidth-bound"),  # busy, within 2x of the floor
    (1.0, 0.95, 0.2, "kernel-bound"),     # busy, 5x the floor
    (1.0, 0.95, None, "kernel-bound"),    # no floor known: busy is all it can say
])
def test_verdict(step, busy, floor, expected):
    assert dp.verdict(step, busy, floor) == expected


def test_summary_per_step():
    kernels = [(0.0, 0.4e-3), (0.5e-3, 0.9e-3), (1.0e-3, 1.8e-3), (1.9e-3, 1.95e-3)]
    out = dp.summarise(kernels, steps=2, wall_s=2e-3, host_s=0.5e-3, floor_s=0.6e-3)
    assert out["kernels_per_step"] == 2
    assert out["busy_ms_per_step"] == pytest.approx(0.825)
    assert out["step_ms"] == pytest.approx(1.0) and out["host_ms_per_step"] == pytest.approx(0.25)
    assert out["fraction_of_floor"] == pytest.approx(0.6)
    assert out["verdict"] == "bandwidth-bound"
    # the timed TPOT, when given, is the step (the profiler's overhead would inflate it)
    assert dp.summarise(kernels, 2, 2e-3, 0.5e-3, 0.6e-3, step_s=0.9e-3)["step_ms"] == pytest.approx(0.9)


def test_cpu_has_no_decode_profile():
    profile, reason = dp.profile(object(), torch.zeros((1, 1)), torch.device("cpu"), None)
    assert profile is None and "CUDA only" in reason
