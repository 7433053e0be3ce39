"""The README's "one run", started the way a user or a scheduler starts it: `deepspeed` (its
per-node launcher) or `torchrun` on launch/run.py, with no run_id given.

- every successful launch exits 0, every time (tensor, pipeline, full model parallel, and
  again): a rank that aborts at interpreter exit fails the launcher even after an ok record;
- every record carries the run_id `gptbench run` would derive, so reports can read it;
- pipelines whose micro-batches outnumber a small parity probe run (the probe is one whole
  batch by default);
- a rank that refuses its configuration leaves its error file, so the launcher can name it.
"""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from gptbench import launcher, results
from gptbench.config import load_config
from gptbench.runplan import run_id_for
from paths import ROOT
from paths import TINY_CPU as CONFIG

COMMON = ["workload.output_len=4", "workload.num_samples=4", "workload.iterations=1",
          "workload.warmup=0", "engine.profile_comm=false", "engine.comm_timeout_s=60"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
# (name, ranks, variants of one --sweep): the same ranks run the variants one after the other.
TWO = [{"strategy": "tp", "topology.tp": 2},
       {"strategy": "pp", "topology.micro_batches": 4}]  # m=4 > the old 2-sequence probe
FOUR = [{"strategy": "full", "topology.tp": 2, "topology.pp": 2},
        {"strategy": "pp", "topology.pp": 4}]             # m defaults to pp=4
LAUNCHES = [("two-a", 2, TWO), ("two-b", 2, TWO), ("four", 4, FOUR)]


def _pairs(variant: dict) -> list[str]:
    return [f"{k}={v}" for k, v in variant.items()]


def _deepspeed(out, ranks: int, variants: list[dict]) -> subprocess.CompletedProcess:
    sweep = out / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"runs": variants}), encoding="utf-8")
    cmd = launcher.deepspeed_command(CONFIG, COMMON + [f"output_dir={out}"], ranks)
    return subprocess.run(cmd + ["--sweep", str(sweep)], env=ENV, capture_output=True,
                          text=True, timeout=600)


def _torchrun(out) -> subprocess.CompletedProcess:
    from gptbench.worker import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(ROOT, "launch", "run.py"), "--config", CONFIG]
    for pair in COMMON + [f"output_dir={out}", "strategy=pp"]:
        cmd += ["--set", pair]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    got = {}
    for name, ranks, variants in LAUNCHES:
        out = tmp_path_factory.mktemp(name)
        got[name] = (out, ranks, variants, _deepspeed(out, ranks, variants))
    out = tmp_path_factory.mktemp("torchrun")
    got["torchrun"] = (out, 2, [{"strategy": "pp"}], _torchrun(out))
    return got


@pytest.mark.parametrize("name", [n for n, _, _ in LAUNCHES] + ["torchrun"])
def test_a_successful_launch_exits_0(launches, name):
    _, _, _, proc = launches[name]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "terminate called" not in output, output[-3000:]


@pytest.mark.parametrize("name", [n for n, _, _ in LAUNCHES] + ["torchrun"])
def test_every_record_has_the_run_id_gptbench_run_derives(launches, name):
    out, ranks, variants, _ = launches[name]
    for variant in variants:
        run_id = run_id_for(load_config(CONFIG, COMMON + _pairs(variant)), ranks)
        record = results.read_record(results.run_path(str(out), run_id))
        assert record is not None, sorted(os.listdir(out / "runs"))
        assert record["run_id"] == run_id and record["status"] == "ok", record["error"]
        assert record["parity"]["passed"], record["parity"]


def test_pipelines_with_more_micro_batches_than_the_old_probe_run(launches):
    """m=4 with the default probe: one whole batch (4 sequences), one per micro-batch."""
    for name, _ranks, run_id in (("two-a", 2, "2r-pp-tp1-pp2"), ("four", 4, "4r-pp-tp1-pp4")):
        record = results.read_record(results.run_path(str(launches[name][0]), run_id))
        assert record["topology"]["micro_batches"] == 4
        assert record["parity"]["samples"] == 4 and record["parity"]["tokens_match"]


def test_the_worker_destroys_its_process_groups(tmp_path):
    """Deterministic half of the exit-0 check: after a finished run the worker leaves no
    process group (and so none of the C++ threads a group owns) to interpreter exit."""
    from gptbench.worker import _free_port

    code = ("import sys, threading, torch.distributed as dist\n"
            "from gptbench.worker import main\n"
            f"rc = main(['--config', {CONFIG!r}, '--set', 'output_dir={tmp_path}'] + "
            f"{[a for p in COMMON for a in ('--set', p)]!r})\n"
            "alive = [t.name for t in threading.enumerate() if not t.daemon "
            "and t is not threading.main_thread()]\n"
            "print('RESULT', rc, dist.is_initialized(), alive)\n")
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "RESULT 0 False []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2,
                    reason="needs a machine with fewer than 2 GPUs")
def test_every_rank_that_refuses_leaves_its_error_file(tmp_path):
    """Too few GPUs is found by every rank of the node; each leaves its error file, so the
    launcher names a rank and the reason instead of 'no rank reported an error'."""
    sets = COMMON + [f"output_dir={tmp_path}", "engine.device=cuda"]
    cmd = launcher.deepspeed_command(CONFIG, sets, 2)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    cfg = load_config(CONFIG, sets)
    run_id = run_id_for(cfg, 2)
    errors = launcher._rank_errors(str(tmp_path), run_id, 2)
    # The first rank to refuse exits at once, and DeepSpeed's launcher then stops the
    # other: it leaves its file only if it got as far as the check. Every file there is,
    # names the reason; the record names a rank that refused.
    assert errors and set(errors) <= {0, 1}, proc.stderr[-2000:]
    assert all("cuda requested for 2 rank(s)" in e["error"] for e in errors.values())
    record = launcher.finalize(cfg, run_id, 2, proc.returncode, False, 0.0)
    first = min(errors)
    assert record["failed_rank"] == first
    assert record["error"].startswith(f"rank {first}: engine.device: cuda requested for 2 rank(s)")
