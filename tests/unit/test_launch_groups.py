"""Grouping a suite's rows into launches, the fault selector and the per-row log split:
the parts of grouped launches that need no process (tests/integration/test_grouping.py
runs the real thing)."""
import os

import pytest

from gptbench import faults, launcher, suite
from gptbench.errors import UserError
from paths import ROOT


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
