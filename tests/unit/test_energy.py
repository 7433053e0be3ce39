"""Energy over the timed passes: the NVML counter is a stand-in (no GPU here); the meter's
arithmetic, its reasons and the record's sums are the real code. On a machine with an NVIDIA
GPU, one test reads the real counter around a busy loop."""
import pynvml
import pytest
import torch

from gptbench.trackers import energy
from gptbench.trackers.gpu_util import nvml_gpu_count


class FakeNVML:
    """pynvml's names that the meter uses; the counter returns `readings_mj` in turn (an
    exception instance is raised instead). Errors are pynvml's own classes."""
    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported

    def __init__(self, readings_mj, init_error=None):
        self.readings_mj, self.init_error = list(readings_mj), init_error
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        assert handle == "handle-of-0"
        value = self.readings_mj.pop(0)
        if isinstance(value, Exception):
            raise value
        return value


def meter(fake, times=(10.0, 12.5)):
    clock = iter(times)
    return energy.EnergyMeter(0, nvml=fake, handle_of=lambda gpu: f"handle-of-{gpu}",
                              clock=lambda: next(clock))


def test_joules_are_the_counter_difference_in_millijoules(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNVML([1_000_000_000, 1_000_750_500])  # +750.5 J over 2.5 s
    m = meter(fake)
    m.start()
    m.stop()
    reading, reason = m.result()
    assert reason is None
    assert reading == {"joules": 750.5, "seconds": 2.5, "gpu": "0"}
    assert fake.inits == fake.shutdowns == 1


def test_a_gpu_without_the_counter_is_null_with_the_reason(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNVML([pynvml.NVMLError_NotSupported(pynvml.NVML_ERROR_NOT_SUPPORTED)])
    m = meter(fake)
    m.start()
    m.stop()
    reading, reason = m.result()
    assert reading is None and "no total-energy counter" in reason and "Volta" in reason
    assert fake.inits == fake.shutdowns == 1


def test_no_driver_and_a_counter_that_went_backwards_are_reasons(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    m = meter(FakeNVML([], init_error=pynvml.NVMLError_DriverNotLoaded(
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
    m.start()
    m.stop()
    assert m.result()[0] is None and m.result()[1].startswith("no NVIDIA driver")
    m = meter(FakeNVML([5000, 1000]))
    m.start()
    m.stop()
    assert m.result() == (None, "the energy counter went backwards (driver reloaded?)")


def test_a_cpu_run_reads_no_counter_and_says_why(monkeypatch):
    def forbidden():
        raise AssertionError("a CPU run must not touch NVML")
    monkeypatch.setattr(pynvml, "nvmlInit", forbidden)
    m = energy.meter_for(torch.device("cpu"))
    m.start()
    m.stop()
    reading, reason = m.result()
    assert reading is None and "uses no GPU (device: cpu)" in reason


def rank(joules, seconds, gpu="0", host="a"):
    return {"energy": {"joules": joules, "seconds": seconds, "gpu": gpu}, "energy_reason": None,
            "host": host}


def test_the_record_sums_joules_and_watts_over_gpus_per_generated_token():
    block, reason = energy.energy_block([rank(600.0, 2.0, "0"), rank(900.0, 3.0, "1")], 3000)
    assert reason is None
    assert block["joules"] == 1500.0
    assert block["average_watts"] == 300.0 + 300.0
    assert block["joules_per_token"] == 0.5
    assert block["per_rank_joules"] == [600.0, 900.0] and block["gpus"] == 2


def test_a_gpu_shared_by_two_ranks_counts_once_and_a_missing_one_nulls_the_block():
    block, _ = energy.energy_block([rank(600.0, 2.0, "0"), rank(610.0, 2.0, "0"),
                                    rank(600.0, 2.0, "0", host="b")], 100)
    assert block["joules"] == 1200.0 and block["gpus"] == 2
    missing = {"energy": None, "energy_reason": "GPU 1 has no total-energy counter", "host": "a"}
    assert energy.energy_block([rank(1.0, 1.0), missing], 10) == (
        None, "GPU 1 has no total-energy counter")


@pytest.mark.skipif(not torch.cuda.is_available() or nvml_gpu_count() == 0,
                    reason="needs an NVIDIA GPU and driver")
def test_a_busy_gpu_draws_energy():
    m = energy.meter_for(torch.device("cuda", 0))
    x = torch.randn(4096, 4096, device="cuda")
    m.start()
    for _ in range(200):
        x = x @ x
        x = x / x.norm()
    torch.cuda.synchronize()
    m.stop()
    reading, reason = m.result()
    if reason and "no total-energy counter" in reason:
        pytest.skip(reason)
    assert reason is None and reading["joules"] > 0
    assert 10 < reading["joules"] / reading["seconds"] < 2000  # watts of one board
