"""Every `make` target the README tells users to type does something.

`make -n TARGET` must print the target's own command (GNU make skips implicit rules for
.PHONY targets, so a pattern rule there printed "Nothing to be done" and exited 0). On a
machine with fewer GPUs than a GPU target needs, the target must fail with one line that
says what is missing, before anything starts.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from paths import ROOT

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
# The venv running these tests, if `make install` made it (its stamp): make then installs
# nothing and runs the target with this Python.
VENV = sys.prefix
INSTALLED = os.path.exists(os.path.join(VENV, ".gptbench-installed"))
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def expand_braces(word: str) -> list[str]:
    """Shell brace expansion: bench-{2,4}gpu-{dp,tp} -> bench-2gpu-dp, bench-2gpu-tp, ..."""
    match = re.search(r"\{([^{}]*)\}", word)
    if not match:
        return [word]
    head, tail = word[:match.start()], word[match.end():]
    return [w for option in match.group(1).split(",") for w in expand_braces(head + option + tail)]


def readme_targets() -> list[str]:
    """Targets of `make X` in inline code and of command lines in code blocks, and the
    brace patterns (bench-{2,4}gpu-{...}) the README gives for a family of targets."""
    code = re.findall(r"`([^`\n]+)`", README) + re.findall(r"(?m)^\s*(make .*)$", README)
    named = {m.split()[1] for m in code if m.startswith("make ") and len(m.split()) > 1}
    named |= set(re.findall(r"(?<![\w/.-])(bench-[\w{},-]*\{[^\s`]*)", README))
    return sorted({t for word in named for t in expand_braces(word)})


# GPUs each GPU target needs on this machine (suite-gpu.yaml: rows of 1, 2 and 4 ranks).
GPUS_NEEDED = {"bench-1gpu": 1, "bench-all": 4, "bench-emulate": 1,
               **{f"bench-{n}gpu-{s}": n for n in (2, 4) for s in ("dp", "tp", "pp", "full")}}


def make(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", ROOT, f"VENV={VENV}", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_the_readme_names_every_gpu_row():
    targets = readme_targets()
    assert set(GPUS_NEEDED) <= set(targets), sorted(set(GPUS_NEEDED) - set(targets))
    assert {"demo", "test", "report", "bench-cpu", "gpu-check"} <= set(targets)


@pytest.mark.parametrize("target", readme_targets())
def test_every_readme_target_expands_to_a_command(target):
    # `install` is a stamp file that is up to date once installed: ask what it would run.
    proc = make("-n", *(["-B"] if target == "install" else []), target)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.strip()]
    assert commands and "Nothing to be done" not in proc.stdout + proc.stderr, proc.stdout
    row = re.fullmatch(r"bench-(\dgpu-\w+)", target)
    if row:
        assert any(f"suite deepspeed_configs/suite-gpu.yaml --resume --only {row.group(1)}" in c
                   for c in commands), commands


def _gpus_here() -> int:
    from gptbench.trackers.gpu_util import nvml_gpu_count

    return nvml_gpu_count()


# One target per GPU count (each run imports torch: ~5-10 s).
SHORT_OF_GPUS = [t for t in ("bench-1gpu", "bench-2gpu-tp", "bench-4gpu-full", "bench-all")
                 if GPUS_NEEDED[t] > _gpus_here()]


@pytest.mark.skipif(not INSTALLED, reason="needs the venv `make install` builds")
@pytest.mark.parametrize("target", SHORT_OF_GPUS)
def test_too_few_gpus_fail_with_one_line_naming_them(target, tmp_path):
    """Nothing is started: the suite's output folder stays empty."""
    proc = make(target, "HF_HUB_OFFLINE=1", timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gptbench")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gptbench: error: ") and "GPU" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
