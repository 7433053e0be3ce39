"""`gptbench diagnose` on the machine the tests run on, never crashing."""

import os
import subprocess
import sys

import deepspeed
import pytest
import torch

from gptbench.diagnose import diagnose
from gptbench.trackers.gpu_util import nvml_gpu_count
from paths import ROOT


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
        cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "torch.cuda.is_available() is False" in result.stdout


def test_comm_measures_this_backend_and_plan_reads_it(tmp_path):
    out = tmp_path / "comm.json"
    result = subprocess.run([sys.executable, "-m", "gptbench.cli", "diagnose", "--comm",
                             "--comm-ranks", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    data = json.loads(out.read_text())
    assert data["schema"] == "gptbench.comm/1"
    assert data["backend"] == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    ops = {(e["op"], e["group_size"]) for e in data["entries"]}
    assert ops == {("all_reduce", 2), ("broadcast", 2), ("barrier", 2), ("p2p", 2), ("p2p_ready", 2)}
    sizes = sorted(e["bytes"] for e in data["entries"] if e["op"] == "all_reduce")
    assert sizes[0] <= 12_800 <= sizes[-1] and sizes[0] <= 402_056 <= sizes[-1]  # GPT-2 XL tp
    assert all(e["latency_us"] > 0 for e in data["entries"])
    assert "written:" in result.stdout
    from gptbench.plan import plan

    rows = plan("gpt2-xl", 2, "rtx3080", comm_file=str(out))
    tp = next(r for r in rows if r.strategy == "tensor_data_hybrid")
    assert tp.tpot_ms_predicted > tp.tpot_ms_bound


def test_comm_bad_ranks_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptbench.cli", "diagnose", "--comm",
                             "--comm-ranks", "1", "--out", str(tmp_path / "c.json")],
                            capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 2 and "--comm-ranks" in result.stderr
    assert "Traceback" not in result.stderr
