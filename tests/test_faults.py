"""A failing rank ends the whole run quickly with a record that names it: real 2-rank runs
through the `deepspeed` launcher with GPTBENCH_FAULT injected into rank 1.

crash, hang and oom meet every strategy family, and every injection point (load, prefill,
decode) meets every kind and every family once (a Latin square: 9 runs, not 27). A hang is
found by the peer's collective timeout (engine.comm_timeout_s), long before timeout_s; one
more run hangs with a long collective timeout so that timeout_s has to stop it.
"""
import os
import time

import psutil
import pytest

from gptbench import launcher, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "deepspeed_configs", "tiny-cpu.yaml")
COMM_TIMEOUT_S = 15
TIMEOUT_S = 120
END_BOUND_S = 110  # a fault must end the run well before timeout_s stops it
COMMON = ["workload.output_len=4", "workload.num_samples=4", "workload.iterations=1",
          "workload.warmup=0", "parity.enabled=false", "engine.profile_comm=false"]
# (strategy, kind, point): rows are families, each kind and each point once per row/column.
CASES = [
    ("pure_data_parallel", "crash", "load"),
    ("pure_data_parallel", "hang", "decode"),
    ("pure_data_parallel", "oom", "prefill"),
    ("tensor_data_hybrid", "crash", "prefill"),
    ("tensor_data_hybrid", "hang", "load"),
    ("tensor_data_hybrid", "oom", "decode"),
    ("pipeline_data_hybrid", "crash", "decode"),
    ("pipeline_data_hybrid", "hang", "prefill"),
    ("pipeline_data_hybrid", "oom", "load"),
]
EXPECTED_STATUS = {"crash": "failed", "hang": "failed", "oom": "oom"}


def survivors(marker: str) -> list[str]:
    """Live processes (launcher or rank) whose command line holds `marker`."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
                out.append(f"{p.pid}: {' '.join(p.info['cmdline'])[:200]}")
        except psutil.Error:
            continue
    return out


def run_with_fault(tmp_path, run_id: str, strategy: str, fault: str, extra=()):
    out = tmp_path / run_id
    sets = COMMON + [f"strategy={strategy}", f"output_dir={out}", f"run_id={run_id}",
                     f"engine.comm_timeout_s={COMM_TIMEOUT_S}", f"timeout_s={TIMEOUT_S}", *extra]
    log = tmp_path / f"{run_id}.log"
    started = time.monotonic()
    record = launcher.run(CONFIG, sets, ranks=2, log_path=str(log),
                          env={"GPTBENCH_FAULT": fault, "HF_HUB_OFFLINE": "1"})
    elapsed = time.monotonic() - started
    print(f"{run_id}: {record['status']} after {elapsed:.1f} s: {record['error']}")
    return record, elapsed, log.read_text(encoding="utf-8", errors="replace"), str(out)


@pytest.mark.parametrize("strategy,kind,point", CASES,
                         ids=[f"{s.split('_')[0]}-{k}-at-{p}" for s, k, p in CASES])
def test_a_failing_rank_ends_the_run_and_is_named(tmp_path, strategy, kind, point):
    record, elapsed, log, out = run_with_fault(tmp_path, f"{kind}-{point}", strategy,
                                               f"rank=1,at={point},kind={kind}")
    assert f"rank 1: GPTBENCH_FAULT: injecting {kind} at {point}" in log  # the fault fired
    assert elapsed < END_BOUND_S, f"took {elapsed:.0f} s"
    assert record["status"] == EXPECTED_STATUS[kind], record["error"]
    assert record["failed_rank"] == 1, record["error"]
    error = record["error"]
    assert "\n" not in error
    if kind == "hang":
        assert error.startswith("rank 1 stopped responding; rank 0 gave up waiting"), error
    else:
        injected = "crash" if kind == "crash" else "out of memory"
        assert error.startswith("rank 1: ") and f"injected {injected} at {point}" in error, error
    assert record["metrics"] is None and record["null_reasons"]["metrics"]
    # The record on disk is the one returned, whole.
    assert results.read_record(os.path.join(out, "runs", f"{kind}-{point}.json")) == record
    assert survivors(out) == []


def test_a_run_past_timeout_s_is_stopped(tmp_path):
    """Rank 1 hangs and the collective timeout is longer than timeout_s: the launcher stops
    every process of the run at timeout_s and records `timeout`."""
    limit_s = 30
    record, elapsed, log, out = run_with_fault(
        tmp_path, "timeout", "pure_data_parallel", "rank=1,at=load,kind=hang",
        extra=["engine.comm_timeout_s=600", f"timeout_s={limit_s}"])
    assert record["status"] == "timeout", record["error"]
    assert record["failed_rank"] is None
    assert f"timeout_s={limit_s}" in record["error"]
    assert limit_s <= elapsed < limit_s + 2 * launcher.GRACE_S + 5, f"took {elapsed:.0f} s"
    assert survivors(out) == []


def test_the_same_runs_without_a_fault_pass(tmp_path):
    """The injected fault, not the setup, is what fails the runs above."""
    record, _, log, out = run_with_fault(tmp_path, "clean", "tensor_data_hybrid", "")
    assert record["status"] == "ok", record["error"]
    assert "GPTBENCH_FAULT" not in log
    assert survivors(out) == []
