"""Where a run is, on the console while it runs: loading the model -> sharding ->
(compiling) -> parity probe -> warm-up -> iteration 2/3, batch 4/5 -> profiling ->
gathering results.

The output rank reports (`phase`, `counting_barrier`); the others report nothing. Reports
are made at phase boundaries and between batches, never inside a timed region: the batch
count rides on the barrier that starts every timed batch (inside an iteration's wall time,
like the barrier itself, outside every TTFT/TPOT/e2e region), and costs one small write.

Transport: `gptbench run` and a suite row pass a file in GPTBENCH_PROGRESS; the rank
overwrites it with one JSON line, and the orchestrator's `watch` thread polls it and draws
the line (a tqdm bar on a terminal, one line per phase otherwise). A direct `deepspeed
launch/run.py` has no orchestrator: the rank draws the line itself, on stderr.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager

ENV = "GPTBENCH_PROGRESS"
# Rank 0's line on stdout at the start of each row of a launch: the orchestrator splits the
# launch's output into per-row logs there and times each row from it.
ROW_MARKER = "gptbench: === row "
RECORD_BYTES = 256  # the file is overwritten in place: one fixed-size record, space-padded
POLL_S = 0.25


class Display:
    """Draws one run's progress: a tqdm bar on a terminal, a line per phase otherwise."""

    def __init__(self, label: str, stream=None, position: int | None = None):
        self.label, self.stream, self.last_phase = label, stream or sys.stderr, None
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, desc=label, file=self.stream, leave=False, position=position,
                            dynamic_ncols=True, bar_format="{desc} {bar}| {n_fmt}/{total_fmt} [{elapsed}]")

    def show(self, state: dict) -> None:
        phase, done, total = state.get("phase"), state.get("done"), state.get("total")
        label = state.get("run") or self.label  # a launch of several rows names the row
        text = f"{label}: {phase}" + (f", {state['detail']}" if state.get("detail") else "")
        if self.bar is not None:
            if total != self.bar.total:
                self.bar.reset(total=total)
            self.bar.n = done or 0
            self.bar.set_description_str(text, refresh=False)
            self.bar.refresh()
        elif phase != self.last_phase:
            print(text, file=self.stream, flush=True)
        self.last_phase = phase

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Reporter:
    """The rank's side: where it is, written to the GPTBENCH_PROGRESS file or drawn."""

    def __init__(self, run_id: str, enabled: bool, path: str | None):
        self.run_id, self.enabled, self.fd, self.display = run_id, enabled, None, None
        if enabled and path:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            except OSError:
                self.enabled = False  # no console feedback is no reason to fail a run
        elif enabled:
            self.display = Display(run_id)

    def phase(self, name: str, done: int | None = None, total: int | None = None,
              detail: str | None = None) -> None:
        if not self.enabled:
            return
        state = {"run": self.run_id, "phase": name, "done": done, "total": total,
                 "detail": detail}
        if self.fd is not None:
            line = json.dumps(state).encode("utf-8")[:RECORD_BYTES - 1]
            os.pwrite(self.fd, line.ljust(RECORD_BYTES - 1) + b"\n", 0)
        else:
            self.display.show(state)


_reporter = Reporter("", False, None)


def start(run_id: str, enabled: bool) -> None:
    """Make this process report for `run_id` (call on every rank; only `enabled` reports)."""
    global _reporter
    if _reporter.fd is not None:  # the row before, in a launch of several
        os.close(_reporter.fd)
    _reporter = Reporter(run_id, enabled, os.environ.get(ENV))


def phase(name: str, done: int | None = None, total: int | None = None, detail: str | None = None) -> None:
    _reporter.phase(name, done, total, detail)


def counting_barrier(barrier, batches: int, iterations: int):
    """`barrier` for `runner.run_timed`, which calls it once per iteration and once before
    every batch; on the reporting rank each call before a batch also reports it."""
    if not _reporter.enabled:
        return barrier
    calls = 0

    def counted():
        nonlocal calls
        iteration, position = divmod(calls, batches + 1)
        calls += 1
        if position:
            phase("timed iterations", done=iteration * batches + position - 1, total=batches * iterations,
                  detail=f"iteration {iteration + 1}/{iterations}, batch {position}/{batches}")
        barrier()

    return counted


def read_state(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(RECORD_BYTES))
    except (OSError, ValueError):
        return None  # not written yet, or caught mid-write: the next poll reads it


@contextmanager
def watch(path: str, label: str, stream=None, position: int | None = None):
    """While the body runs, show what the rank writes to `path` (GPTBENCH_PROGRESS)."""
    if os.path.exists(path):
        os.unlink(path)  # left by an earlier run of this run_id
    display, stop = Display(label, stream, position), threading.Event()

    def poll():
        last, stopping = None, False
        while not stopping:
            stopping = stop.wait(POLL_S)  # once more after the stop: the last state is shown
            state = read_state(path)
            if state is not None and state != last:
                display.show(state)
                last = state

    thread = threading.Thread(target=poll, name="gptbench-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        display.close()
        if os.path.exists(path):
            os.unlink(path)
