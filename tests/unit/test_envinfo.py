"""The env block of a run record, checked against the live interpreter and a real git repo."""

import os
import platform
import shutil
import socket
import subprocess
import time

import deepspeed
import pytest
import torch
import transformers

from gptbench.envinfo import collect_env, git_commit


def test_collect_env_on_cpu_matches_the_running_software():
    env = collect_env(torch.device("cpu"))
    assert env == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "device": "cpu",
        "device_name": env["device_name"],
        "cuda": torch.version.cuda,
        "nccl": None,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "backend": "gloo",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
    }


def test_cpu_device_name_is_the_model_in_proc_cpuinfo():
    name = collect_env(torch.device("cpu"))["device_name"]
    assert name
    if os.path.exists("/proc/cpuinfo") and "model name" in open("/proc/cpuinfo").read():
        assert f": {name}\n" in open("/proc/cpuinfo").read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_collect_env_on_cuda_names_the_gpu_and_nccl():
    env = collect_env(torch.device("cuda", 0))
    assert env["device_name"] == torch.cuda.get_device_name(0)
    assert env["backend"] == "nccl"
    assert env["nccl"] == ".".join(map(str, torch.cuda.nccl.version()))


def test_git_commit_outside_any_checkout_is_none_without_running_git(tmp_path):
    start_s = time.perf_counter()
    assert git_commit(tmp_path) is None
    assert time.perf_counter() - start_s < 0.1


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_head_of_the_enclosing_repo_and_none_before_the_first_commit(tmp_path):
    _git(tmp_path, "init", "-q")
    package_dir = tmp_path / "pkg"
    package_dir.mkdir()
    assert git_commit(package_dir) is None
    (package_dir / "a.txt").write_text("a")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    assert git_commit(package_dir) == _git(tmp_path, "rev-parse", "HEAD")
    assert len(git_commit(package_dir)) == 40
