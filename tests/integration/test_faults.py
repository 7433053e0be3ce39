"""A failing rank ends the whole run quickly with a record that names it: real 2-rank runs
through the `deepspeed` launcher with GPTBENCH_FAULT injected into rank 1.

crash, hang and oom meet every strategy family, and every injection point (load, prefill,
decode) meets every kind and every family once (a Latin square: 9 runs, not 27). A hang is
found by the peer's collective timeout (engine.comm_timeout_s), long before timeout_s; one
more run hangs with a long collective timeout so that timeout_s has to stop it. Each test
checks that its fault fired (the rank's "injecting" line in the log), so a run that failed
for another reason does not pass.
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from gptbench import launcher, results
from paths import TINY_CPU as CONFIG

COMM_TIMEOUT_S = 15
TIMEOUT_S = 120
END_BOUND_S = 100  # a fault must end the run well before timeout_s stops it
TIMEOUT_LIMIT_S = 30
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


def run_with_fault(tmp_path, run_id: str, strategy: str, fault: str, extra=()) -> dict:
    out = tmp_path / run_id
    sets = COMMON + [f"strategy={strategy}", f"output_dir={out}", f"run_id={run_id}",
                     f"engine.comm_timeout_s={COMM_TIMEOUT_S}", f"timeout_s={TIMEOUT_S}", *extra]
    log = tmp_path / f"{run_id}.log"
    started = time.monotonic()
    record = launcher.run(CONFIG, sets, ranks=2, log_path=str(log),
                          env={"GPTBENCH_FAULT": fault, "HF_HUB_OFFLINE": "1"})
    elapsed = time.monotonic() - started
    return {"record": record, "elapsed": elapsed, "out": str(out),
            "log": log.read_text(encoding="utf-8", errors="replace"),
            "survivors": survivors(str(out))}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every run of this file, three at a time: a hang spends COMM_TIMEOUT_S idle, so the
    runs overlap their waits (the file takes about 60% of the time of one by one)."""
    tmp_path = tmp_path_factory.mktemp("faults")
    jobs = {"timeout": ("pure_data_parallel", "rank=1,at=load,kind=hang",
                        ["engine.comm_timeout_s=600", f"timeout_s={TIMEOUT_LIMIT_S}"])}
    jobs.update({f"{k}-{p}": (s, f"rank=1,at={p},kind={k}", []) for s, k, p in CASES})
    jobs["sigkill"] = ("tensor_data_hybrid", "rank=1,at=decode,kind=sigkill", [])
    # transformers' lazy imports are not thread-safe: take them here, once, in this thread.
    launcher.prepare(CONFIG, COMMON + ["strategy=tp"], ranks=2)
    # The long ones first, so the short ones fill the gaps.
    order = sorted(jobs, key=lambda j: ("timeout" not in j and "hang" not in j))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {j: pool.submit(run_with_fault, tmp_path, j, *jobs[j]) for j in order}
        got = {j: f.result() for j, f in futures.items()}
    for j in order:
        print(f"{j}: {got[j]['record']['status']} after {got[j]['elapsed']:.1f} s: "
              f"{got[j]['record']['error']}")
    return got


@pytest.mark.parametrize("strategy,kind,point", CASES,
                         ids=[f"{s.split('_')[0]}-{k}-at-{p}" for s, k, p in CASES])
def test_a_failing_rank_ends_the_run_and_is_named(outcomes, strategy, kind, point):
    o = outcomes[f"{kind}-{point}"]
    record = o["record"]
    assert record["strategy"] == strategy
    assert f"rank 1: GPTBENCH_FAULT: injecting {kind} at {point}" in o["log"]  # it fired
    assert o["elapsed"] < END_BOUND_S, f"took {o['elapsed']:.0f} s"
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
    assert results.read_record(os.path.join(o["out"], "runs", f"{kind}-{point}.json")) == record
    assert o["survivors"] == []


def test_a_run_past_timeout_s_is_stopped(outcomes):
    """Rank 1 hangs and the collective timeout is longer than timeout_s: the launcher stops
    every process of the run at timeout_s and records `timeout`."""
    o = outcomes["timeout"]
    record = o["record"]
    assert record["status"] == "timeout", record["error"]
    assert record["failed_rank"] is None
    assert f"timeout_s={TIMEOUT_LIMIT_S}" in record["error"]
    assert TIMEOUT_LIMIT_S <= o["elapsed"] < TIMEOUT_LIMIT_S + 2 * launcher.GRACE_S + 5
    assert o["survivors"] == []


def test_a_rank_killed_by_a_signal_is_named_with_the_signal(outcomes):
    """Rank 1 SIGKILLs itself, as the OOM killer would: no error file, no exception; the
    launcher exits 247 (or its peer, which lost the connection, exits 1 first). The record
    and the console name the rank, the signal and its peak memory instead of 'no rank
    reported an error' or 'rank 1 stopped responding'."""
    o = outcomes["sigkill"]
    record = o["record"]
    assert "rank 1: GPTBENCH_FAULT: injecting sigkill at decode" in o["log"]
    assert record["status"] == "failed" and record["failed_rank"] == 1, record["error"]
    assert record["error"].startswith("rank 1 was killed by SIGKILL - likely out of host "
                                      "memory"), record["error"]
    assert "peak RSS" in record["error"]
    assert record["rank_peak_rss_bytes"]["per_rank"][1] > 50e6  # a rank imports torch
    assert o["survivors"] == []
