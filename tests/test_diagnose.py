"""`gptbench diagnose` on the machine the tests run on, never crashing."""

import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch

from gptbench.diagnose import diagnose
from gptbench.trackers.gpu_util import nvml_gpu_count


@pytest.mark.skipif(torch.cuda.is_available() or nvml_gpu_count() > 0,
                    reason="this machine has a GPU")
def test_without_gpu_says_so_and_exits_0():
    text, exit_code = diagnose()
    assert exit_code == 0
    assert "no NVIDIA GPU found" in text
    assert "no NVIDIA driver" in text
    assert f"torch {torch.__version__}" in text
    assert f"deepspeed {deepspeed.__version__}" in text
    assert "not applicable: no CUDA" in text
    assert "PROBLEM" not in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_with_gpus_lists_each_visible_one_and_exits_0():
    text, exit_code = diagnose()
    assert exit_code == 0, text
    for index in range(torch.cuda.device_count()):
        assert f"cuda:{index} {torch.cuda.get_device_name(index)} -> NVML" in text


@pytest.mark.skipif(nvml_gpu_count() == 0, reason="needs an NVIDIA driver with a GPU")
def test_gpus_hidden_from_torch_are_a_problem_with_exit_1():
    # A repeated CUDA_VISIBLE_DEVICES entry hides every GPU from CUDA, while NVML still sees them.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,0"}
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; from gptbench.diagnose import diagnose; "
         "text, code = diagnose(); print(text); sys.exit(code)"],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "torch.cuda.is_available() is False" in result.stdout
