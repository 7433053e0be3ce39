"""Ranks that die without a word: a signal (the OOM killer's SIGKILL) or torch's NCCL
watchdog aborting the process after a collective timeout. The launcher must name the rank
and what happened, from what it saw of the ranks (their processes and their output).

The watchdog lines are torch's own wording (tests/fixtures/nccl_watchdog_timeout.log says
where each comes from); the processes are real ones, killed by real signals.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from gptbench import launcher, rankwatch
from gptbench.config import load_config
from gptbench.rankwatch import RankWatch, signal_of_exit_code, watchdog_timeout
from paths import FIXTURES
from paths import TINY_CPU as CONFIG

FIXTURE = os.path.join(FIXTURES, "nccl_watchdog_timeout.log")
# The rank-0 line of a timed-out tensor-parallel all-reduce in a subgroup (PG ID 2): the
# global rank comes from c10's "[rank3]:" prefix, not from the group rank.
SUBGROUP = ("[rank3]:[E1128 04:53:09.417702118 ProcessGroupNCCL.cpp:685] [PG ID 2 PG GUID 5(undefined) "
            "Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
            "OpType=BROADCAST, NumelIn=4, NumelOut=4, Timeout(ms)=60000) ran for 60081 "
            "milliseconds before timing out.")


def _lines():
    with open(FIXTURE, encoding="utf-8") as f:
        return f.read().splitlines()


def test_watchdog_lines_name_the_global_rank_and_the_collective():
    found = [watchdog_timeout(line) for line in _lines()]
    assert [f for f in found if f] == [(0, {"op": "ALLREDUCE", "seq": 57, "ran_s": 120.004,
                                            "timeout_s": 120.0})] * 3
    assert watchdog_timeout(SUBGROUP) == (3, {"op": "BROADCAST", "seq": 9, "ran_s": 60.081,
                                             "timeout_s": 60.0})
    assert all(watchdog_timeout(line) is None for line in _lines() if "Watchdog" not in line)


@pytest.mark.parametrize("code, name", [(247, "SIGKILL"), (250, "SIGABRT"), (-9, "SIGKILL"),
                                        (245, "SIGSEGV"), (1, None), (0, None), (None, None)])
def test_launcher_exit_codes_map_to_signals(code, name):
    number = signal_of_exit_code(code)
    assert (signal.Signals(number).name if number else None) == name


def _record(tmp_path, watch, returncode):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"])
    return launcher.finalize(cfg, "r", watch.world, returncode, False, 1.0, watch)


def test_an_nccl_abort_names_the_silent_rank_and_the_timed_out_collective(tmp_path):
    """Rank 0's watchdog aborted it (launcher exit 250 = SIGABRT); rank 1 said nothing:
    rank 1 is the one that stopped responding. The output reaches the log unchanged."""
    read_end, write_end = os.pipe()
    log = open(tmp_path / "run.log", "wb")
    watch = RankWatch(launcher.ENTRY, 2, sink=log)
    with os.fdopen(read_end, "rb") as stream:
        watch.follow(stream)
        with os.fdopen(write_end, "wb") as w:
            w.write(open(FIXTURE, "rb").read())
        watch.close()
    log.close()
    assert (tmp_path / "run.log").read_bytes() == open(FIXTURE, "rb").read()
    record = _record(tmp_path, watch, 250)
    assert record["status"] == "failed" and record["failed_rank"] == 1
    assert record["error"] == (
        "rank 1 stopped responding; rank 0 gave up waiting for it: NCCL watchdog timed out "
        "in ALLREDUCE after 120 s (engine.comm_timeout_s=120, collective #57) and aborted "
        "the process (SIGABRT)")


def test_when_every_rank_timed_out_the_first_is_named(tmp_path):
    watch = RankWatch(launcher.ENTRY, 4)
    for line in [SUBGROUP, *(SUBGROUP.replace("[rank3]", f"[rank{r}]") for r in (0, 1, 2))]:
        watch.scan(line)
    record = _record(tmp_path, watch, 250)
    assert record["failed_rank"] == 0
    assert record["error"].startswith("rank 0: NCCL watchdog timed out in BROADCAST after 60 s")


def _fake_rank(rank: int, body: str) -> subprocess.Popen:
    """A process that looks like a rank to the watch: launch/run.py's path on its command
    line and RANK in its environment (a real run's ranks are found the same way)."""
    code = f"import time\n{body}\n"
    return subprocess.Popen([sys.executable, "-c", code, launcher.ENTRY],
                            env={**os.environ, "RANK": str(rank)})


def test_a_rank_killed_by_sigkill_is_named_with_its_peak_memory(tmp_path):
    """Rank 1 grows to ~200 MB and is SIGKILLed (what the OOM killer does); rank 0 is
    killed a second later (what DeepSpeed's launcher does to the others)."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watch = RankWatch(launcher.ENTRY, 2)
    ranks = [_fake_rank(0, "time.sleep(60)"),
             _fake_rank(1, "x = bytearray(200 * 2**20)\nx[::4096] = b'1' * len(x[::4096])\n"
                           "time.sleep(60)")]
    try:
        watch._ranks = {p.pid: r for r, p in enumerate(ranks)}  # as _find_ranks would
        deadline = time.monotonic() + 30
        while watch.peak_rss_bytes.get(1, 0) < 200 * 2**20 and time.monotonic() < deadline:
            watch.poll(parent.pid)
            time.sleep(rankwatch.POLL_S)
        ranks[1].send_signal(signal.SIGKILL)
        for _ in range(10):
            watch.poll(parent.pid)
            time.sleep(rankwatch.POLL_S)
        ranks[0].send_signal(signal.SIGKILL)
        for _ in range(3):
            watch.poll(parent.pid)
            time.sleep(rankwatch.POLL_S)
    finally:
        for p in ranks + [parent]:
            p.kill()
            p.wait()
    assert watch.first_dead() == ([1], signal.SIGKILL)
    rank, line = watch.explain(247)
    assert rank == 1
    assert line.startswith("rank 1 was killed by SIGKILL - likely out of host memory "
                           "(the kernel's OOM killer); peak RSS 0.2"), line
    assert "launcher exit code" not in line  # the signal came from the rank itself
    record = _record(tmp_path, watch, 247)
    assert record["failed_rank"] == 1 and record["error"] == line
    assert record["rank_peak_rss_bytes"]["per_rank"][1] >= 200 * 2**20


def test_find_ranks_reads_rank_from_the_process_environment():
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, os, time\n"
                               f"p = subprocess.Popen([sys.executable, '-c', 'import time; "
                               f"time.sleep(60)', {launcher.ENTRY!r}], "
                               "env={**os.environ, 'RANK': '3'})\n"
                               "time.sleep(60)\n"])
    try:
        watch = RankWatch(launcher.ENTRY, 4)
        deadline = time.monotonic() + 30
        while not watch._ranks and time.monotonic() < deadline:
            watch._find_ranks(parent.pid)
            time.sleep(0.1)
        assert list(watch._ranks.values()) == [3]
    finally:
        for child in __import__("psutil").Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def test_ranks_stopped_by_the_launcher_are_not_the_cause():
    """Rank 0 failed (exit 1, its error file says why); DeepSpeed's launcher then SIGTERMs
    rank 1, seen dead in the same poll: SIGTERM is how launchers stop ranks, not a cause."""
    watch = RankWatch(launcher.ENTRY, 2)
    watch.died = {0: (10.0, None), 1: (10.05, signal.SIGTERM)}
    assert watch.first_dead() == ([0, 1], None)
    assert watch.explain(1) is None
    watch.died[1] = (10.05, signal.SIGKILL)  # the OOM killer's signal is a cause
    assert watch.first_dead() == ([1], signal.SIGKILL)
