"""Feedback inside a run: the output rank's phase and batch on the console, never inside a
timed region. The timed loop is the real `runner.run_timed` on a scripted generator; the
end-to-end test is a real `gptbench run`."""
import io
import os
import subprocess
import sys

import torch

from gptbench import progress, runner
from gptbench.strategies.base import Step
from paths import ROOT, TINY_CPU

PHASES = ("loading the model", "sharding", "compiling", "parity probe", "warm-up", "timed iterations",
          "profiling one batch", "gathering results")


class Tty(io.StringIO):
    def isatty(self):
        return True


class Gen:
    """prefill/decode that log themselves; tokens count up."""

    def __init__(self, events):
        self.events = events

    def prefill(self, ids):
        self.events.append("prefill")
        return Step(tokens=ids[:, -1] + 1, logits=None, input_len=ids.shape[1])

    def decode(self, tokens):
        self.events.append("decode")
        return Step(tokens=tokens + 1, logits=None, input_len=1)


def test_batches_are_reported_between_timed_regions_never_inside(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    monkeypatch.setenv(progress.ENV, str(path))
    progress.start("r", enabled=True)
    events, clock_ticks = [], iter(range(1000))
    original = progress._reporter.phase

    def phase(name, done=None, total=None, detail=None):
        events.append(("progress", detail))
        original(name, done, total, detail)
    monkeypatch.setattr(progress._reporter, "phase", phase)

    def clock():
        events.append("clock")
        return float(next(clock_ticks))

    batches = [torch.zeros(2, 3, dtype=torch.long)] * 3
    barrier = progress.counting_barrier(lambda: events.append("barrier"), len(batches), 2)
    runner.run_timed(Gen(events), batches, output_len=4, iterations=2, warmup=1, barrier=barrier, clock=clock)

    reports = [e[1] for e in events if isinstance(e, tuple)]
    assert reports == [f"iteration {i}/2, batch {b}/3" for i in (1, 2) for b in (1, 2, 3)]
    # A batch's timed region runs from the clock before its prefill to the clock after its
    # last decode; every report sits before the barrier that precedes that region.
    for index, event in enumerate(events):
        if isinstance(event, tuple):
            assert events[index + 1] == "barrier" and events[index + 2] == "clock"
            assert events[index + 3] == "prefill"
    assert progress.read_state(str(path)) == {"run": "r", "phase": "timed iterations",
                                              "done": 5, "total": 6,
                                              "detail": "iteration 2/2, batch 3/3"}


def test_a_rank_that_does_not_report_gets_its_barrier_untouched():
    progress.start("r", enabled=False)
    barrier = object()
    assert progress.counting_barrier(barrier, 3, 2) is barrier
    progress.phase("loading the model")  # no file, no output, no error


def test_watch_shows_each_phase_once_on_a_plain_stream(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    monkeypatch.setenv(progress.ENV, str(path))
    monkeypatch.setattr(progress, "POLL_S", 0.01)
    stream = io.StringIO()
    with progress.watch(str(path), "2r-tp", stream=stream):
        progress.start("2r-tp", enabled=True)
        for name in ("loading the model", "warm-up"):
            progress.phase(name)
            wait_until(lambda name=name: name in stream.getvalue())
        progress.phase("timed iterations", 0, 2, "iteration 1/1, batch 1/2")
        wait_until(lambda: "batch 1/2" in stream.getvalue())
        progress.phase("timed iterations", 1, 2, "iteration 1/1, batch 2/2")
    assert stream.getvalue().splitlines() == [
        "2r-tp: loading the model", "2r-tp: warm-up", "2r-tp: timed iterations, iteration 1/1, batch 1/2"]
    assert not path.exists()  # the orchestrator removes the file


def test_a_terminal_gets_a_bar_with_iteration_and_batch():
    stream = Tty()
    display = progress.Display("4r-full", stream=stream)
    display.show({"phase": "timed iterations", "done": 6, "total": 15, "detail": "iteration 2/3, batch 2/5"})
    display.close()
    assert "4r-full: timed iterations, iteration 2/3, batch 2/5" in stream.getvalue()
    assert "6/15" in stream.getvalue()


def wait_until(condition, timeout_s: float = 10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the watcher never showed it"
        time.sleep(0.01)


def test_gptbench_run_shows_the_phases_of_the_output_rank(tmp_path):
    """A real 1-rank run; stderr is not a terminal, so each phase the watcher saw is a line."""
    env = {k: v for k, v in os.environ.items() if k != "GPTBENCH_FAULT"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "gptbench.cli", "run", "--config", TINY_CPU,
         "--set", f"output_dir={tmp_path}", "--set", "workload.output_len=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = [line.split(": ", 1)[1].split(",")[0] for line in proc.stderr.splitlines()
             if line.startswith("1r-dp-tp1-pp1: ")]
    assert shown and shown[0] == "loading the model and the parity reference"
    assert all(phase.startswith(PHASES) for phase in shown)
    order = [next(i for i, p in enumerate(PHASES) if phase.startswith(p)) for phase in shown]
    assert order == sorted(order) and len(set(order)) >= 3, shown
    assert not list((tmp_path / "runs" / ".ranks").glob("*.progress"))
