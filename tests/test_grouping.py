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

from gptbench import faults, launcher, suite
from gptbench.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _runs(*ranks):
    return [suite.SuiteRun(f"r{i}", n, ()) for i, n in enumerate(ranks)]


def test_launch_groups_are_consecutive_runs_of_one_rank_count():
    groups = suite.launch_groups(_runs(1, 2, 2, 4, 2))
    assert [[r.run_id for r in g] for g in groups] == [["r0"], ["r1", "r2"], ["r3"], ["r4"]]
    assert len(suite.launch_groups(_runs(2, 2, 2), isolate=True)) == 3


def test_isolate_must_be_a_boolean(tmp_path):
    path = tmp_path / "s.yaml"
    base = os.path.join(ROOT, "deepspeed_configs", "tiny-cpu.yaml")
    path.write_text(f"base: {base}\nisolate: sometimes\nruns: [{{id: a}}]\n")
    with pytest.raises(UserError, match="isolate must be true or false"):
        suite.load_suite(str(path))
    path.write_text(f"base: {base}\nisolate: true\nruns: [{{id: a}}]\n")
    assert suite.load_suite(str(path)).isolate is True


def test_fault_run_selector():
    fault = faults.parse("rank=1,at=load,kind=crash,run=b")
    assert fault.run == "b"
    assert faults.Injector(fault, 1, None, "a").fault is None
    assert faults.Injector(fault, 1, None, "b").fault == fault
    assert faults.Injector(faults.parse("rank=1,at=load,kind=crash"), 1, None, "a").fault


def test_row_logs_split_at_the_markers(tmp_path):
    rows = [launcher.Row(n, (), str(tmp_path / f"{n}.log")) for n in ("x", "y")]
    seen = []
    logs = launcher.RowLogs(rows, on_row=seen.append)
    logs.write(b"start-up\n" + f"{launcher.ROW_MARKER}x (1/2)\nx work\n".encode())
    logs.write(f"{launcher.ROW_MARKER}y (2/2)\ny wo".encode())
    logs.write(b"rk\n")
    logs.close()
    assert (tmp_path / "x.log").read_text() == f"start-up\n{launcher.ROW_MARKER}x (1/2)\nx work\n"
    # the launch's start-up opens every row's log
    assert (tmp_path / "y.log").read_text() == f"start-up\n{launcher.ROW_MARKER}y (2/2)\ny work\n"
    assert seen == ["y"] and logs.current == "y"
