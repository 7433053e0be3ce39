"""Where a number was measured: software versions, device, commit, host.

Every run record carries this (`env`), so two results can be told apart later. Versions of
DeepSpeed and transformers come from package metadata, which avoids importing them (~2 s).
"""

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path

import torch

GIT_TIMEOUT_S = 2.0


def collect_env(device: torch.device) -> dict:
    is_cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "transformers": package_version("transformers"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if is_cuda else cpu_model(),
        "cuda": torch.version.cuda,
        "nccl": nccl_version() if is_cuda else None,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "backend": "nccl" if is_cuda else "gloo",
        "cpu_count": os.cpu_count(),
        # CPU runs are limited by what this process may use, not by what the host has.
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux x86), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nccl_version() -> str | None:
    """torch's bundled NCCL as "major.minor.patch"; torch returns a tuple or an int."""
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    if isinstance(version, int):  # NCCL_VERSION_CODE: major*1000+minor*100+patch, *10000 from 2.9
        major, rest = divmod(version, 10000 if version >= 10000 else 1000)
        return f"{major}.{rest // 100}.{rest % 100}"
    return ".".join(str(part) for part in version)


def git_commit(start: Path = Path(__file__)) -> str | None:
    """HEAD of the git checkout holding `start` (this package); None without git or commits.

    Looks for `.git` itself first, so machines without a checkout never spawn git.
    """
    checkout = next((parent for parent in [start.resolve(), *start.resolve().parents]
                     if (parent / ".git").exists()), None)
    if checkout is None or shutil.which("git") is None:
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--verify", "--quiet", "HEAD"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()
