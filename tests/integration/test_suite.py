"""`gptbench suite` end to end, as a user drives it: a tiny suite (one 1-rank run, one 2-rank
tensor-parallel run, one not-applicable configuration) interrupted with Ctrl-C, resumed,
resumed again, then started afresh and stopped with SIGTERM.

Each step is the real command in its own process, the steps share one output folder and
run in order (module fixtures), and every test checks one promise about that folder.
"""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from paths import ROOT, TINY_CPU

RUN_IDS = ("1r-dp", "2r-tp", "2r-full")
SUITE = """\
title: reliability suite
output_dir: out
base: tiny.yaml
set:
  workload.output_len: 4
  workload.num_samples: 4
  workload.iterations: 1
  workload.warmup: 0
  engine.profile_comm: false
  engine.comm_timeout_s: 60
  timeout_s: 240
runs:
  - {id: 1r-dp, ranks: 1, set: {strategy: pure_data_parallel}}
  - {id: 2r-tp, ranks: 2, set: {strategy: tensor_data_hybrid, topology.tp: 2}}
  - {id: 2r-full, ranks: 2, set: {strategy: full_model_parallel}}
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GPTBENCH_FAULT"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    return env


def _command(work, *args) -> list[str]:
    return [sys.executable, "-m", "gptbench.cli", "suite", str(work / "suite.yaml"), *args]


def _finish(work, *args) -> subprocess.CompletedProcess:
    return subprocess.run(_command(work, *args), cwd=work, env=_env(), capture_output=True,
                          text=True, timeout=400)


def _processes(work) -> list[psutil.Process]:
    """Live processes started for this folder (launchers and ranks; not the suite itself)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if (p.info["status"] != psutil.STATUS_ZOMBIE and str(work) in line
                    and ("deepspeed" in line or "launch/run.py" in line)):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _interrupt(work, sig: int, when, *args) -> tuple[int, str, str, float]:
    """Start the suite, send `sig` to it (only to it) once `when()` holds; (exit code,
    stdout, stderr, seconds from the signal to the exit)."""
    out, err = open(work / "stdout.txt", "w+"), open(work / "stderr.txt", "w+")
    proc = subprocess.Popen(_command(work, *args), cwd=work, env=_env(), stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while not when():
            assert proc.poll() is None, "the suite ended before it could be interrupted"
            assert time.monotonic() < deadline, "the moment to interrupt never came"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        ended = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out.seek(0), err.seek(0)
    return code, out.read(), err.read(), ended


def _runs_of(cmdline: list[str]) -> str:
    """The run settings a rank was started with: its --set pairs, or its --sweep file (a
    suite launches consecutive rows of one rank count together)."""
    if "--sweep" in cmdline:
        with open(cmdline[cmdline.index("--sweep") + 1], encoding="utf-8") as f:
            return f.read()
    return " ".join(cmdline)


def _rank_of(work, run_id: str):
    return lambda: any("launch/run.py" in " ".join(p.cmdline()) and f"run_id={run_id}" in
                       _runs_of(p.cmdline()) for p in _processes(work))


def _json_files(folder) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)
                  + glob.glob(os.path.join(folder, "**", ".*", "*.json"), recursive=True))


def _measurement(body: bytes):
    """What a rerun would change."""
    r = json.loads(body)
    return r["created_at"], r["wall_s"], (r["metrics"] or {}).get("throughput_tokens_per_s")


def _stamps(work) -> dict:
    runs = work / "out" / "runs"
    return {n: (os.stat(runs / n).st_mtime_ns, (runs / n).read_bytes())
            for n in sorted(os.listdir(runs)) if n.endswith(".json")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("suite")
    text = open(TINY_CPU, encoding="utf-8").read()
    (work / "tiny.yaml").write_text(text, encoding="utf-8")
    (work / "suite.yaml").write_text(SUITE, encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def interrupted(work):
    """Ctrl-C while 2r-tp runs, after 1r-dp was recorded."""
    code, out, err, ended = _interrupt(work, signal.SIGINT, _rank_of(work, "2r-tp"))
    print(f"SIGINT: the suite exited {ended:.1f} s after the signal")
    return {"code": code, "stdout": out, "stderr": err, "ended_s": ended,
            "stamps": _stamps(work), "survivors": [p.pid for p in _processes(work)],
            "json": _json_files(work / "out")}


@pytest.fixture(scope="module")
def resumed(work, interrupted):
    logs = work / "out" / "logs"
    before = {n: os.stat(logs / n).st_mtime_ns for n in os.listdir(logs)}
    proc = _finish(work, "--resume")
    return {"proc": proc, "log_stamps_before": before, "stamps": _stamps(work)}


@pytest.fixture(scope="module")
def resumed_again(work, resumed):
    proc = _finish(work, "--resume")
    return {"proc": proc, "stamps": _stamps(work)}


def test_ctrl_c_stops_the_suite_and_keeps_finished_records(interrupted):
    assert interrupted["code"] == 130, interrupted["stderr"][-2000:]
    assert interrupted["ended_s"] < 30, "stopping the ranks took too long"
    assert "interrupted" in interrupted["stderr"]
    assert "suite.yaml --resume" in interrupted["stderr"]
    assert "Traceback" not in interrupted["stderr"]
    # 1r-dp finished and is kept; 2r-tp was stopped and has no record; 2r-full never started.
    assert list(interrupted["stamps"]) == ["1r-dp.json"]
    record = json.loads(interrupted["stamps"]["1r-dp.json"][1])
    assert record["status"] == "ok", record["error"]


def test_ctrl_c_leaves_no_half_written_json_and_no_process(interrupted):
    for path in interrupted["json"]:
        with open(path, encoding="utf-8") as f:
            json.load(f)  # raises on a half-written file
    assert interrupted["survivors"] == []


def test_resume_runs_only_what_is_missing(work, resumed, interrupted):
    proc = resumed["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "1r-dp: already recorded (ok), skipped" in said
    assert "2r-tp: already recorded" not in said
    # 1r-dp was not run again: its measurement and its log are untouched.
    assert (_measurement(resumed["stamps"]["1r-dp.json"][1])
            == _measurement(interrupted["stamps"]["1r-dp.json"][1]))
    log = work / "out" / "logs" / "1r-dp.log"
    assert os.stat(log).st_mtime_ns == resumed["log_stamps_before"]["1r-dp.log"]


def test_every_configuration_is_recorded_exactly_once(work, resumed):
    runs = work / "out" / "runs"
    assert sorted(n for n in os.listdir(runs) if n.endswith(".json")) == sorted(
        f"{r}.json" for r in RUN_IDS)
    # A run_id that ran twice would have moved its first record to runs/.previous.
    assert not (runs / ".previous").exists()
    with open(work / "out" / "summary.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in rows) == sorted(RUN_IDS)


def _summary(work) -> dict:
    with open(work / "out" / "summary.csv", encoding="utf-8", newline="") as f:
        return {row["run_id"]: row for row in csv.DictReader(f)}


def test_statuses_speedup_and_report(work, resumed):
    records = {n[:-5]: json.loads(body) for n, (_, body) in resumed["stamps"].items()}
    assert records["1r-dp"]["status"] == "ok" and records["2r-tp"]["status"] == "ok"
    full = records["2r-full"]
    assert full["status"] == "not_applicable" and "needs tp>=2 and pp>=2" in full["error"]
    # Records keep no speedup (it would go stale); the report derives it.
    assert records["2r-tp"]["metrics"]["speedup"] is None
    assert "derived by the reader" in records["2r-tp"]["null_reasons"]["metrics.speedup"]
    rows = _summary(work)
    throughput = {k: r["metrics"]["throughput_tokens_per_s"] for k, r in records.items() if r["metrics"]}
    assert float(rows["2r-tp"]["speedup"]) == pytest.approx(throughput["2r-tp"] / throughput["1r-dp"])
    assert rows["2r-tp"]["baseline_run_id"] == "1r-dp" and rows["2r-tp"]["scaling"] == "strong"
    assert rows["1r-dp"]["scaling"] == "baseline" and float(rows["1r-dp"]["speedup"]) == 1.0
    for name in ("report.html", "report.md", "summary.csv"):
        assert (work / "out" / name).stat().st_size > 0, name


def test_resume_of_a_finished_suite_runs_nothing(resumed_again, resumed):
    proc = resumed_again["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    for run_id, status in zip(RUN_IDS, ("ok", "ok", "not_applicable")):
        assert f"{run_id}: already recorded ({status}), skipped" in said
    assert "0 run(s) this time" in said
    assert ({n: _measurement(b) for n, (_, b) in resumed_again["stamps"].items()}
            == {n: _measurement(b) for n, (_, b) in resumed["stamps"].items()})


@pytest.fixture(scope="module")
def rerun_baseline(work, resumed_again):
    """`--only 1r-dp`: the baseline measured again, the other records untouched."""
    before = _summary(work)
    proc = _finish(work, "--only", "1r-dp")
    return {"proc": proc, "before": before, "after": _summary(work), "stamps": _stamps(work)}


def test_rerunning_the_baseline_moves_the_other_speedups(rerun_baseline, resumed_again):
    assert rerun_baseline["proc"].returncode == 0, rerun_baseline["proc"].stderr[-3000:]
    before, after = rerun_baseline["before"], rerun_baseline["after"]
    assert after["1r-dp"]["throughput_tokens_per_s"] != before["1r-dp"]["throughput_tokens_per_s"]
    assert after["2r-tp"]["throughput_tokens_per_s"] == before["2r-tp"]["throughput_tokens_per_s"]
    assert rerun_baseline["stamps"]["2r-tp.json"] == resumed_again["stamps"]["2r-tp.json"]  # not rewritten
    assert float(after["2r-tp"]["speedup"]) == pytest.approx(
        float(after["2r-tp"]["throughput_tokens_per_s"]) / float(after["1r-dp"]["throughput_tokens_per_s"]))
    assert after["2r-tp"]["speedup"] != before["2r-tp"]["speedup"]


def test_a_fresh_start_moves_results_aside_and_sigterm_stops_it(work, rerun_baseline):
    before = rerun_baseline["stamps"]
    code, out, err, ended = _interrupt(work, signal.SIGTERM, _rank_of(work, "1r-dp"))
    print(f"SIGTERM: the suite exited {ended:.1f} s after the signal")
    assert code == 143, err[-2000:]
    assert ended < 30
    assert "Traceback" not in err
    aside = glob.glob(str(work / "out.prev-*"))
    assert len(aside) == 1, os.listdir(work)
    assert f"moved to {os.path.basename(aside[0])}" in out
    kept = {n: (work / aside[0] / "runs" / n).read_bytes() for n in before}
    assert kept == {n: body for n, (_, body) in before.items()}  # not overwritten
    assert (work / aside[0] / "report.html").exists()
    runs = work / "out" / "runs"
    assert not runs.exists() or not [n for n in os.listdir(runs) if n.endswith(".json")]
    assert _processes(work) == []
