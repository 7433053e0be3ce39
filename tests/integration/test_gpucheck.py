"""`make gpu-check`'s logic that needs no GPU: which rows are refused before launch (and
why), the targets, the table; and the script's behaviour on a machine without a GPU."""
import os
import shutil
import subprocess

import pytest

from gptbench import gpucheck
from paths import ROOT


def row_named(name):
    return next(r for r in gpucheck.ROWS if r.name == name)


@pytest.mark.parametrize("name,reason", [("ds_inject", "transformers<=4.51"),
                                         ("ds_inject_graph", "replays it for every later call")])
def test_deepspeed_kernel_rows_are_refused_before_launch(tmp_path, name, reason):
    out = gpucheck.run_row(row_named(name), str(tmp_path), deadline=0)  # no time left
    assert out["status"] == "refused"
    assert reason in out["error"]
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_rows_put_the_compiled_deepspeed_path_second():
    names = [r.name for r in gpucheck.ROWS]
    assert names[:3] == ["hf_eager", "deepspeed_compiled", "hf_compiled"]
    assert {"deepspeed_compiled_sdpa", "deepspeed_compiled_tuned", "deepspeed"} <= set(names)
    overrides = {r.name: r.overrides for r in gpucheck.ROWS}
    assert "engine.compile=reduce-overhead" in overrides["deepspeed_compiled"]
    assert "engine.attention=sdpa" in overrides["deepspeed_compiled_sdpa"]
    assert "engine.tuning=coordinate_descent" in overrides["deepspeed_compiled_tuned"]
    assert "engine.compile=off" in overrides["deepspeed"]


def row(name, backend, tokens_per_s, tpot, fraction=None, parity=True, status="ok"):
    out = gpucheck.not_run(row_named(name), None)
    out.update(status=status, backend=backend, tokens_per_s=tokens_per_s, tpot_ms_p50=tpot,
               roofline_fraction=fraction, parity_passed=parity, error=None,
               bytes_per_decode_step=3.2e9, device_peak_gbps=4800.0)
    return out


def test_targets_take_the_best_deepspeed_row_with_parity():
    rows = [row("hf_eager", "hf_eager", 100.0, 30.0),
            row("deepspeed_compiled", "deepspeed", 1200.0, 1.5, fraction=0.6),
            row("deepspeed", "deepspeed", 2000.0, 1.0, fraction=0.9, parity=False),
            row("hf_compiled", "hf_compiled", 900.0, 2.0)]
    t = gpucheck.evaluate_targets(rows)
    assert t["best_deepspeed_row"] == "deepspeed_compiled"  # the faster row failed parity
    assert t["roofline"]["met"] is True
    assert t["tpot_vs_hf_compiled"]["ratio"] == pytest.approx(0.75)
    assert t["tpot_vs_hf_compiled"]["met"] is False
    assert t["roofline"]["tpot_ms_at_target"] == pytest.approx(3.2e9 / (0.5 * 4800e9) * 1e3)
    rows[1]["decode_profile"] = {"step_ms": 1.5, "kernels_per_step": 120, "busy_ms_per_step": 1.4,
                                 "host_ms_per_step": 0.3, "fraction_of_floor": 0.45,
                                 "floor_ms": 0.67, "verdict": "kernel-bound"}
    table = gpucheck.format_table({"device_name": "test card", "rows": rows, "targets": t})
    assert "deepspeed_compiled" in table and "0.75x" in table
    assert "120 kernels" in table and "kernel-bound" in table


def test_no_targets_without_a_deepspeed_row():
    t = gpucheck.evaluate_targets([row("hf_eager", "hf_eager", 100.0, 30.0)])
    assert t["best_deepspeed_row"] is None and t["roofline"]["met"] is None
    assert t["reasons"] == ["no DeepSpeed row ran with parity passed"]


def has_gpu() -> bool:
    return bool(shutil.which("nvidia-smi")) and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU")
def test_script_says_no_gpu_and_exits_1():
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "no NVIDIA GPU on this machine" in out.stderr


def test_stage_probe_runs_interleaved_micro_batches_on_cpu():
    """The probe gpu-check runs on one GPU, here eager against eager on the tiny model:
    interleaving micro-batches over their own caches gives the same tokens."""
    import torch

    from gptbench import stage_probe

    out = stage_probe.probe(torch.device("cpu"), torch.float32, "off", preset="tiny",
                            input_len=16, steps=4)
    assert out["token_match_rate"] == 1.0
    assert out["eager"]["decode_step_ms"] > 0 and out["compiled"]["graphs"] == 0
    assert "stage probe (tiny preset" in gpucheck.format_stage_probe({**out, "status": "ok"})


def test_script_runs_the_proofs_bounded_then_the_rows_with_the_rest_of_the_budget(tmp_path):
    """The script's one call past its GPU checks, on this CPU machine: a stand-in
    nvidia-smi and a Python that claims CUDA only for the script's own check. The proofs run
    (CPU variants, or skipped with their reasons) within their budget and are written;
    then gpucheck starts with the rows' share (and, having no GPU, exits 1)."""
    import json
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    check = "import torch, sys; sys.exit(not torch.cuda.is_available())"
    (bin_dir / "py").write_text(
        f"#!/bin/bash\nif [ \"$1\" = -c ] && [ \"$2\" = '{check}' ]; then exit 0; fi\n"
        f"exec {sys.executable} \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "py"),
           "GPU_CHECK_OUT": str(tmp_path / "out"), "GPU_PROOF_BUDGET_S": "20",
           "GPTBENCH_SITE": str(tmp_path / "site")}
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    proofs = json.loads((tmp_path / "out" / "proofs.json").read_text())
    from gptbench.gpuproofs import PROOFS

    assert [p["name"] for p in proofs["proofs"]] == list(PROOFS)
    assert proofs["budget_s"] == 20 and all(p["wall_s"] < 40 for p in proofs["proofs"])
    assert out.returncode == 1 and "torch sees no CUDA device" in out.stderr, out.stderr[-800:]
