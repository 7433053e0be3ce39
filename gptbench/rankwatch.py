"""What the launcher sees of its ranks while they run, for the record when one dies unheard.

A rank killed by a signal writes no error file: the kernel's OOM killer sends SIGKILL, and
on NCCL torch's watchdog thread aborts the process (SIGABRT) when a collective times out,
with no Python exception. The launcher then only exits with 256 - signal (247, 250). So
while the run goes on, `RankWatch`
- passes the launcher's output through (console or log) and picks torch's watchdog
  timeout lines out of it;
- polls every rank process (found by its launch/run.py command line and RANK) for its
  peak resident memory (VmHWM) and the moment it died, with the signal that ended it
  (a dead rank stays a zombie until its launcher reaps it; /proc gives its wait status).
`explain` turns that into a sentence naming the rank.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

import psutil

POLL_S = 0.1
# How launchers stop the other ranks once one has failed (DeepSpeed's launch.py: SIGTERM,
# SIGKILL 30 s later; gptbench's stop(): SIGTERM, SIGKILL after GRACE_S): never the cause.
CLEANUP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SCAN_S = 0.5  # how often to look for rank processes not yet seen
# torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp, WorkNCCL::checkTimeout():
#   c10::str(logPrefix(), "Watchdog caught collective operation timeout: ", *this,
#            " ran for ", timeElapsed.count(), " milliseconds before timing out.")
# with logPrefix() "[PG ID <id> PG GUID <guid>(<desc>) Rank <group rank>] " and *this
# "WorkNCCL(SeqNum=, OpType=, NumelIn=, NumelOut=, Timeout(ms)=)"; c10's logger puts
# "[rank<global rank>]:" before every line once the default group exists.
WATCHDOG = re.compile(
    r"(?:\[rank(?P<rank>\d+)\]:)?.*?"
    r"\[(?:PG ID (?P<pg>\d+) PG GUID [^\]]*?)?\s*Rank (?P<pg_rank>\d+)\]\s*"
    r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(?P<seq>\d+), "
    r"OpType=(?P<op>\w+)[^)]*?Timeout\(ms\)=(?P<timeout_ms>\d+)\) ran for (?P<ran_ms>\d+) "
    r"milliseconds before timing out")


def watchdog_timeout(line: str) -> tuple[int, dict] | None:
    """(global rank, what timed out) from one line of torch's NCCL watchdog, else None."""
    if "Watchdog caught collective operation timeout" not in line:
        return None
    m = WATCHDOG.search(line)
    if m is None:
        return None
    if m["rank"] is not None:
        rank = int(m["rank"])
    elif m["pg"] in (None, "0"):  # the default group: its ranks are the global ranks
        rank = int(m["pg_rank"])
    else:
        return None
    return rank, {"op": m["op"], "seq": int(m["seq"]), "ran_s": int(m["ran_ms"]) / 1e3,
                  "timeout_s": int(m["timeout_ms"]) / 1e3}


def watchdog_error(t: dict) -> str:
    return (f"NCCL watchdog timed out in {t['op']} after {t['ran_s']:.0f} s "
            f"(engine.comm_timeout_s={t['timeout_s']:g}, collective #{t['seq']}) and aborted "
            f"the process (SIGABRT)")


def signal_of_exit_code(code: int | None) -> int | None:
    """The signal behind a launcher's exit code: DeepSpeed's launcher exits with its
    failed rank's return code, -9 -> 247 (`sys.exit(-9)`); a process killed itself: -9."""
    if code is None or code == 0:
        return None
    number = -code if code < 0 else 256 - code if 128 < code < 256 else None
    return number if number in signal.valid_signals() else None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class RankWatch:
    def __init__(self, entry: str, world: int, sink=None):
        self.entry, self.world = entry, world
        self.sink = sink  # binary stream for the output; None: this process's stdout
        self.timeouts: dict[int, dict] = {}
        self.peak_rss_bytes: dict[int, int] = {}
        self.died: dict[int, tuple[float, int | None]] = {}  # rank -> (when, signal)
        self._ranks: dict[int, int] = {}  # pid -> rank
        self._last_scan = 0.0
        self._reader: threading.Thread | None = None

    # ---- output --------------------------------------------------------------------------
    def follow(self, stream) -> None:
        """Copy `stream` (the launcher's stdout+stderr) to the sink in a thread."""
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True,
                                        name="gptbench-launcher-output")
        self._reader.start()

    def _pump(self, stream) -> None:
        sink = self.sink or getattr(sys.stdout, "buffer", None)
        pending = b""
        while True:
            chunk = os.read(stream.fileno(), 1 << 16)  # what is there: progress shows live
            if not chunk:
                break
            try:
                if sink is not None:
                    sink.write(chunk)
                    sink.flush()
                else:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
            except (OSError, ValueError):  # a closed console must not stop the scan
                pass
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending[-(1 << 16):]
            for line in lines:
                self.scan(line.decode("utf-8", "replace"))
        self.scan(pending.decode("utf-8", "replace"))

    def scan(self, line: str) -> None:
        found = watchdog_timeout(line)
        if found is not None:
            self.timeouts.setdefault(*found)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._reader is not None:
            self._reader.join(timeout_s)

    # ---- processes -----------------------------------------------------------------------
    def wait(self, proc, timeout_s: float) -> bool:
        """Poll the ranks until the launcher exits (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                return False
            self.poll(proc.pid)
            time.sleep(POLL_S)
        self.poll(proc.pid)
        return True

    def poll(self, launcher_pid: int) -> None:
        now = time.monotonic()
        if len(self._ranks) < self.world and now - self._last_scan >= SCAN_S:
            self._last_scan = now
            self._find_ranks(launcher_pid)
        for pid, rank in self._ranks.items():
            if rank in self.died:
                continue
            state, status = _proc_state(pid)
            if state is None or state == "Z":
                self.died[rank] = (now, status & 0x7F if status else None)
                continue
            peak = _peak_rss_bytes(pid)
            if peak:
                self.peak_rss_bytes[rank] = max(peak, self.peak_rss_bytes.get(rank, 0))

    def _find_ranks(self, launcher_pid: int) -> None:
        try:
            children = psutil.Process(launcher_pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            if child.pid in self._ranks:
                continue
            try:
                if self.entry not in " ".join(child.cmdline()):
                    continue
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and rank.isdigit():
                self._ranks[child.pid] = int(rank)

    # ---- verdict -------------------------------------------------------------------------
    def first_dead(self) -> tuple[list[int], int | None]:
        """(the ranks that died first, within one poll; the signal that ended them). Of
        ranks seen dead in the same poll, those ended by a signal come first: a peer that
        lost its connection to a killed rank exits right after it."""
        if not self.died:
            return [], None
        first = min(t for t, _ in self.died.values())
        ranks = sorted(r for r, (t, _) in self.died.items() if t - first <= POLL_S * 1.5)
        killed = [r for r in ranks if self.died[r][1] and self.died[r][1] not in CLEANUP_SIGNALS]
        ranks = killed or ranks
        signals = {self.died[r][1] for r in killed}
        return ranks, (signals.pop() if len(signals) == 1 else None)

    def explain(self, returncode: int | None) -> tuple[int | None, str] | None:
        """(rank, one line) for a run whose ranks reported nothing, when a rank died by a
        signal; None when nothing points at a signal."""
        ranks, number = self.first_dead()
        from_code = number is None
        number = number or signal_of_exit_code(returncode)
        if number is None:
            return None
        name = signal_name(number)
        who = (f"rank {ranks[0]}" if len(ranks) == 1
               else f"one of ranks {', '.join(map(str, ranks))}" if ranks else "a rank")
        line = f"{who} was killed by {name}"
        if number == signal.SIGKILL:
            line += " - likely out of host memory (the kernel's OOM killer)"
        elif number == signal.SIGABRT:
            line = f"{who} aborted ({name})"
        if self.peak_rss_bytes:
            mine = [self.peak_rss_bytes.get(r) for r in ranks if r in self.peak_rss_bytes]
            per_rank = ", ".join(f"{self.peak_rss_bytes[r] / 1e9:.2f}"
                                 for r in sorted(self.peak_rss_bytes))
            line += (f"; peak RSS {max(mine) / 1e9:.2f} GB" if mine else "; peak RSS")
            line += (f" (ranks {per_rank} GB; this machine has "
                     f"{psutil.virtual_memory().total / 1e9:.1f} GB)")
        if from_code:
            line += f" (launcher exit code {returncode})"
        return (ranks[0] if len(ranks) == 1 else None), line

    def peak_rss_record(self) -> dict | None:
        if not self.peak_rss_bytes:
            return None
        per_rank = [self.peak_rss_bytes.get(r) for r in range(self.world)]
        return {"per_rank": per_rank, "max": max(self.peak_rss_bytes.values()),
                "source": f"VmHWM of each rank process, read by the launcher every {POLL_S:g} s"}


def _proc_state(pid: int) -> tuple[str | None, int | None]:
    """(state letter, wait status of a zombie) from /proc/<pid>/stat; (None, None) if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None, None
    state = fields[0]
    # field 52 of proc(5), `exit_code` (Linux >= 3.5): the status waitpid() would report
    status = int(fields[49]) if state == "Z" and len(fields) > 49 else None
    return state, status


def _peak_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
