"""What the launcher puts in every rank's environment."""
import os
import subprocess
import sys

from gptbench import launcher
from paths import ROOT


def test_ranks_number_gpus_by_pci_bus_unless_told_otherwise():
    assert launcher.rank_environment({"PATH": "/bin"})["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert launcher.rank_environment({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})[
        "CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_a_direct_launch_sets_it_before_cuda_starts():
    """`deepspeed launch/run.py` bypasses gptbench's launcher: the worker sets it itself (here
    it exits 2 on a missing config, after setting it, before any CUDA call)."""
    code = ("import os, sys; from gptbench import worker; os.environ.pop('CUDA_DEVICE_ORDER', None);"
            "rc = worker.main(['--config', '/no/such.yaml']);"
            "print(rc, os.environ.get('CUDA_DEVICE_ORDER'))")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_ORDER"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": ROOT})
    assert out.stdout.split()[-2:] == ["2", "PCI_BUS_ID"], out.stderr[-500:]
