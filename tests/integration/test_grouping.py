"""Suite rows grouped into launches: the 2-rank rows of a suite share one launch, and a row
that fails in the middle of the group costs one relaunch, never another row's record.

Real `gptbench suite` commands (DeepSpeed's launcher, gloo, the tiny model). One suite has
a crash injected into its second row (GPTBENCH_FAULT run=ID), one a hang that only the
row's own timeout_s can stop.
"""
import json
import os
import subprocess
import sys

import pytest

from gptbench import faults
from paths import ROOT

HEAD = """\
title: grouping
output_dir: out
base: {base}
set:
  workload.output_len: 4
  workload.num_samples: 4
  workload.iterations: 1
  workload.warmup: 0
  engine.profile_comm: false
  parity.enabled: false
  timeout_s: 240
runs:
"""
ROWS = """\
  - {id: a-dp, ranks: 2, set: {strategy: pure_data_parallel}}
  - {id: b-tp, ranks: 2, set: {strategy: tensor_data_hybrid, topology.tp: 2%s}}
  - {id: c-full, ranks: 2, set: {strategy: full_model_parallel}}
  - {id: d-pp, ranks: 2, set: {strategy: pipeline_data_hybrid}}
"""
HANG_TIMEOUT_S = 25


def _suite(tmp_path, name: str, fault: str, row_b_extra: str = "", common: str = "") -> dict:
    work = tmp_path / name
    work.mkdir()
    head = HEAD.format(base=os.path.join(ROOT, "deepspeed_configs", "tiny-cpu.yaml"))
    (work / "suite.yaml").write_text(head.replace("runs:\n", common + "runs:\n")
                                     + ROWS % row_b_extra, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, faults.ENV: fault}
    proc = subprocess.run([sys.executable, "-m", "gptbench.cli", "suite", "suite.yaml"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    out = work / "out"
    records = {}
    for run_id in ("a-dp", "b-tp", "c-full", "d-pp"):
        path = out / "runs" / f"{run_id}.json"
        records[run_id] = json.loads(path.read_text()) if path.exists() else None
    logs = {p.stem: p.read_text(errors="replace") for p in (out / "logs").glob("*.log")}
    return {"proc": proc, "records": records, "logs": logs}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    return _suite(tmp_path_factory.mktemp("grouping"), "crash",
                  "rank=1,at=prefill,kind=crash,run=b-tp")


@pytest.fixture(scope="module")
def hung(tmp_path_factory):
    return _suite(tmp_path_factory.mktemp("grouping"), "hang",
                  "rank=1,at=decode,kind=hang,run=b-tp", f", timeout_s: {HANG_TIMEOUT_S}",
                  "  engine.comm_timeout_s: 600\n")


def test_a_failing_row_in_the_middle_costs_one_relaunch(crashed):
    r = crashed["records"]
    assert crashed["proc"].returncode == 0, crashed["proc"].stderr[-3000:]
    assert r["a-dp"]["status"] == "ok"
    assert r["a-dp"]["engine"]["launch"] == {"rows": 3, "position": 1}  # shared, then ended
    assert r["b-tp"]["status"] == "failed" and r["b-tp"]["failed_rank"] == 1, r["b-tp"]["error"]
    assert "injected crash at prefill" in r["b-tp"]["error"]
    assert r["c-full"]["status"] == "not_applicable"
    assert r["d-pp"]["status"] == "ok"
    assert r["d-pp"]["engine"]["launch"] == {"rows": 1, "position": 1}  # a fresh launch


def test_each_row_has_its_own_log_section(crashed):
    logs = crashed["logs"]
    assert sorted(logs) == ["a-dp", "b-tp", "d-pp"]  # the not-applicable row starts nothing
    assert "injecting crash at prefill" in logs["b-tp"]
    assert "injecting" not in logs["a-dp"] + logs["d-pp"]
    assert "=== row b-tp (2/3)" in logs["b-tp"] and "=== row b-tp" not in logs["a-dp"]
    assert "a-dp: " in logs["a-dp"] and "tokens/s" in logs["a-dp"]
    assert "--sweep" in logs["d-pp"]  # its own launch's start-up
    assert "WORLD INFO DICT" in logs["b-tp"]  # the start-up of the launch it shared with a-dp


def test_each_row_has_its_own_memory_peak_and_says_how(crashed):
    for run_id in ("a-dp", "d-pp"):
        peak = crashed["records"][run_id]["rank_peak_rss_bytes"]
        assert len(peak["per_rank"]) == 2 and all(p > 50e6 for p in peak["per_rank"])
        assert "reset at its start" in peak["source"], peak["source"]


def test_a_hung_row_is_stopped_by_its_own_timeout_and_the_rest_still_run(hung):
    r = hung["records"]
    assert hung["proc"].returncode == 0, hung["proc"].stderr[-3000:]
    assert r["a-dp"]["status"] == "ok"
    assert r["b-tp"]["status"] == "timeout", r["b-tp"]["error"]
    assert f"timeout_s={HANG_TIMEOUT_S}" in r["b-tp"]["error"]
    # Its time counts from its own start, not the launch's (which began with a-dp).
    assert HANG_TIMEOUT_S <= r["b-tp"]["wall_s"] < HANG_TIMEOUT_S + 5
    assert r["d-pp"]["status"] == "ok"


def test_the_orchestrator_validates_a_cpu_suite_without_torch_transformers_or_deepspeed():
    """`gptbench suite` checks every configuration of the demo before launching: for a CPU
    suite of a preset none of the heavy libraries is imported (each costs seconds per process)."""
    code = ("import sys\n"
            "from gptbench import suite\n"
            "s = suite.load_suite('deepspeed_configs/demo-cpu.yaml')\n"
            "suite.check(s, 'demo')\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
