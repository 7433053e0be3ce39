"""Two nodes for real: DeepSpeed's hostfile launcher (pdsh over ssh, one per-node launcher per
host) on the loopback "hosts" 127.0.0.1 and 127.0.0.2 that `make test-multinode` serves
with its own sshd (scripts/multinode/test.sh). Without them this file is skipped.

Tiny model, CPU, 2 nodes x 2 slots. A watcher samples, while a run goes, every process of
the run on both hosts (the launching side by the run's folder in its command line, the
hosts' side as descendants of the sshd): which ssh connection started each rank, and the
addresses of every TCP connection any of them holds.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from gptbench.hostfile import non_loopback
from gptbench.topology import Grid
from paths import ROOT
from paths import TINY_CPU as CONFIG

HOSTFILE = os.environ.get("GPTBENCH_MULTINODE_HOSTFILE")
if not HOSTFILE:
    pytest.skip("needs the two loopback hosts that `make test-multinode` starts",
                allow_module_level=True)
SSHD_PID = int(os.environ["GPTBENCH_MULTINODE_SSHD_PID"])
HOSTS = ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"]  # rank -> host, node by node
SMALL = {"workload.output_len": 4, "workload.num_samples": 4, "workload.iterations": 1,
         "workload.warmup": 0, "engine.profile_comm": False}
COMM_TIMEOUT_S = 30
FAULT_BOUND_S = COMM_TIMEOUT_S + 30  # a failed node ends the run within this, on both hosts
GONE_WITHIN_S = 15


def gptbench(*args) -> list[str]:
    return [sys.executable, "-m", "gptbench.cli", *args]


def host_side() -> list[psutil.Process]:
    """Everything running in a session of the test sshd: the ranks' side of both hosts."""
    try:
        return psutil.Process(SSHD_PID).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run_side(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            continue
    return out


def leftovers(marker: str) -> list[str]:
    """Live processes of the run on either host, after waiting GONE_WITHIN_S for them."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        alive = []
        for p in {q.pid: q for q in host_side() + run_side(marker)}.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def is_node_launcher(p: psutil.Process, node_rank: int | None = None) -> bool:
    """DeepSpeed's per-node launcher itself (not pdsh or ssh, whose arguments carry its
    command line too)."""
    argv = p.cmdline()
    return (p.name().startswith("python") and "deepspeed.launcher.launch" in argv
            and (node_rank is None or f"--node_rank={node_rank}" in argv))


class Watcher(threading.Thread):
    """Samples the run's processes until stopped: ranks (RANK, SSH_CONNECTION), per-node
    launchers (command lines) and the addresses of every established TCP connection."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.halt = marker, threading.Event()
        self.ranks: dict[int, str] = {}        # rank -> address its ssh session reached
        self.launchers: dict[int, str] = {}    # pid -> command line of a per-node launcher
        self.addresses: set[str] = set()
        self.seen: set[int] = set()            # rank pids already read
        self.samples = 0

    def run(self):
        while not self.halt.is_set():
            for p in host_side() + run_side(self.marker):
                try:
                    self.look(p)
                except psutil.Error:
                    continue
            self.samples += 1
            self.halt.wait(0.3)

    def look(self, p: psutil.Process):
        cmdline = " ".join(p.cmdline())
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_ESTABLISHED:
                self.addresses.update(end.ip for end in (c.laddr, c.raddr) if end)
        if is_node_launcher(p):
            self.launchers[p.pid] = cmdline
        elif "launch/run.py" in cmdline and p.pid not in self.seen:
            env = p.environ()
            if "RANK" in env and "SSH_CONNECTION" in env:
                self.ranks[int(env["RANK"])] = env["SSH_CONNECTION"].split()[2]
                self.seen.add(p.pid)

    def stop(self):
        self.halt.set()
        self.join()


def started(args: list[str], marker: str, env: dict | None = None):
    """(process, watcher, lines with their arrival times) of a gptbench command."""
    watcher = Watcher(marker)
    watcher.start()
    proc = subprocess.Popen(gptbench(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, watcher, lines, reader


def finish(proc, watcher, reader, timeout_s: float) -> float:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.stop()
        reader.join(timeout=10)
    return time.monotonic()


def record_of(folder, run_id: str) -> dict:
    with open(os.path.join(folder, "runs", f"{run_id}.json"), encoding="utf-8") as f:
        return json.load(f)


def sets(mapping: dict) -> list[str]:
    return [x for k, v in mapping.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory):
    """The three strategies through a suite with `hostfile:`, one multi-node launch each."""
    work = tmp_path_factory.mktemp("multinode-suite")
    out = work / "out"
    suite = work / "suite.yaml"
    suite.write_text(json.dumps({
        "title": "two loopback nodes", "output_dir": str(out), "base": CONFIG,
        "hostfile": HOSTFILE, "set": {**SMALL, "engine.comm_timeout_s": COMM_TIMEOUT_S},
        "runs": [{"id": "tp", "set": {"strategy": "tensor_data_hybrid", "topology.tp": 2}},
                 {"id": "pp", "set": {"strategy": "pipeline_data_hybrid", "topology.pp": 2}},
                 {"id": "full", "set": {"strategy": "full_model_parallel", "topology.tp": 2,
                                        "topology.pp": 2}}]}))
    proc, watcher, lines, reader = started(["suite", str(suite)], str(out))
    finish(proc, watcher, reader, timeout_s=540)
    text = "\n".join(line for _, line in lines)
    assert proc.returncode == 0, text[-3000:]
    return {"out": out, "watcher": watcher, "text": text, "leftovers": leftovers(str(out)),
            "records": {i: record_of(out, i) for i in ("tp", "pp", "full")}}


@pytest.mark.parametrize("run_id", ["tp", "pp", "full"])
def test_two_nodes_match_hugging_face_on_every_rank(suite_runs, run_id):
    record = suite_runs["records"][run_id]
    assert record["status"] == "ok", record["error"]
    parity = record["parity"]
    assert parity["passed"] and parity["tokens_match"], parity
    t = record["topology"]  # the last stage's ranks hold logits (every rank without a pipeline)
    assert parity["ranks_checked"] == t["dp"] * t["tp"], parity
    assert all(parity["ranks_tokens_match"]), parity


@pytest.mark.parametrize("run_id", ["tp", "pp", "full"])
def test_record_places_ranks_node_by_node(suite_runs, run_id):
    assert suite_runs["records"][run_id]["status"] == "ok"
    topology = suite_runs["records"][run_id]["topology"]
    assert topology["nodes"] == 2
    assert topology["hosts"] == HOSTS
    grid = Grid(topology["world_size"], topology["dp"], topology["tp"], topology["pp"])
    for group in grid.tp_groups() if grid.tp > 1 else []:  # tensor groups inside one node
        assert len({HOSTS[r] for r in group}) == 1, (group, topology)
    for group in grid.pp_groups() if grid.pp > 1 else []:  # pipeline stages across nodes
        assert [HOSTS[r] for r in group] == ["127.0.0.1", "127.0.0.2"], (group, topology)


def test_each_rank_was_started_over_ssh_on_its_host(suite_runs):
    watcher = suite_runs["watcher"]
    assert watcher.ranks == dict(enumerate(HOSTS)), watcher.ranks
    launchers = list(watcher.launchers.values())
    assert launchers and all("--master_addr=127.0.0.1" in c for c in launchers), launchers
    assert {c.split("--node_rank=")[1].split()[0] for c in launchers} == {"0", "1"}


def test_every_connection_is_loopback(suite_runs):
    # What each rank saw itself (recorded) and what the watcher saw of every process of the
    # runs on both hosts: launcher, pdsh, ssh, per-node launchers, ranks.
    for record in suite_runs["records"].values():
        per_rank = record["topology"]["comm_addresses"]
        assert len(per_rank) == 4 and all(per_rank), per_rank  # every rank has peers
        assert non_loopback(a for addresses in per_rank for a in addresses) == []
    watcher = suite_runs["watcher"]
    assert watcher.samples > 10 and watcher.addresses, watcher.samples
    assert non_loopback(watcher.addresses) == [], watcher.addresses


def test_master_address_was_given_not_asked_for(suite_runs):
    for run_id in ("tp", "pp", "full"):
        log = (suite_runs["out"] / "logs" / f"{run_id}.log").read_text()
        assert "--master_addr=127.0.0.1" in log
        assert "hostname -I" not in log and "Using IP address of" not in log
        assert "export GLOO_SOCKET_IFNAME=lo;" in log  # through .deepspeed_env to both hosts


def test_report_shows_the_node_count(suite_runs):
    report = (suite_runs["out"] / "report.md").read_text()
    for grid in ("dp2 tp2 pp1 on 2 nodes", "dp2 tp1 pp2 m2 on 2 nodes", "dp1 tp2 pp2 m2 on 2 nodes"):
        assert grid in report


def test_nothing_is_left_running_after_the_suite(suite_runs):
    assert suite_runs["leftovers"] == []


def fault_run(tmp_path, run_id: str, strategy: str, fault: str, when_line: str, act=None):
    """A `gptbench run --hostfile` with GPTBENCH_FAULT; `act(marker)` runs once the rank
    prints `when_line`. Returns (record, exit code, seconds from the fault to the end,
    leftovers, output)."""
    out = tmp_path / run_id
    args = ["run", "--config", CONFIG, "--hostfile", HOSTFILE, *sets({
        **SMALL, "strategy": strategy, "output_dir": str(out), "run_id": run_id,
        "engine.comm_timeout_s": COMM_TIMEOUT_S, "timeout_s": 400})]
    proc, watcher, lines, reader = started(args, str(out), env={"GPTBENCH_FAULT": fault})
    fault_at = None
    while proc.poll() is None and fault_at is None:
        fault_at = next((t for t, line in list(lines) if when_line in line), None)
        time.sleep(0.1)
    if fault_at is not None and act is not None:
        act(str(out))
        fault_at = time.monotonic()
    ended = finish(proc, watcher, reader, timeout_s=500)
    text = "\n".join(line for _, line in lines)
    assert fault_at is not None, f"the fault never fired:\n{text[-3000:]}"
    print(f"\n{run_id}: the run ended {ended - fault_at:.1f} s after the fault "
          f"(bound {FAULT_BOUND_S} s)")
    return record_of(out, run_id), proc.returncode, ended - fault_at, leftovers(str(out)), text


def test_a_rank_crashing_on_node_2_ends_the_run_and_names_host_and_rank(tmp_path):
    record, code, took_s, left, text = fault_run(
        tmp_path, "crash", "tensor_data_hybrid", "rank=3,at=decode,kind=crash",
        "rank 3: GPTBENCH_FAULT: injecting crash at decode")
    assert code == 1, text[-3000:]
    assert record["status"] == "failed"
    assert record["failed_rank"] == 3 and record["failed_host"] == "127.0.0.2"
    assert "injected crash at decode" in record["error"]
    assert "[rank 3 ran on 127.0.0.2]" in record["error"]
    assert record["topology"]["hosts"] == HOSTS and record["topology"]["nodes"] == 2
    assert took_s < FAULT_BOUND_S, took_s
    assert left == []


def kill_node_2_launcher(marker: str) -> None:
    """SIGKILL node 2's per-node launcher (node rank 1) of this run, by its pid."""
    launchers = [p for p in run_side(marker) if is_node_launcher(p, node_rank=1)]
    assert len(launchers) == 1, launchers
    os.kill(launchers[0].pid, signal.SIGKILL)


def test_node_2_launcher_killed_at_decode_ends_the_run_and_leaves_nothing(tmp_path):
    # Rank 2 hangs at decode (so the launcher dies while the ranks are mid-generation);
    # its launcher is then killed. The ranks it started must not outlive it.
    record, code, took_s, left, text = fault_run(
        tmp_path, "killed", "pipeline_data_hybrid", "rank=2,at=decode,kind=hang",
        "rank 2: GPTBENCH_FAULT: injecting hang at decode", act=kill_node_2_launcher)
    assert code == 1, text[-3000:]
    assert record["status"] == "failed", record
    assert record["failed_host"] == "127.0.0.2" and record["failed_rank"] in (2, 3), record
    assert took_s < FAULT_BOUND_S, took_s
    assert left == []


def test_diagnose_checks_every_host(tmp_path):
    result = subprocess.run(gptbench("diagnose", "--hostfile", HOSTFILE), capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for host, ranks in (("127.0.0.1", "ranks 0-1"), ("127.0.0.2", "ranks 2-3")):
        assert f"{host} ({ranks}): ssh ok" in result.stdout, result.stdout
    assert "PROBLEM" not in result.stdout


def test_an_unreachable_host_is_named_before_anything_starts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(open(HOSTFILE).read() + "127.0.0.3 slots=1\n")  # no sshd there
    diag = subprocess.run(gptbench("diagnose", "--hostfile", str(hostfile)), capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert diag.returncode == 1
    assert "PROBLEM: 127.0.0.3 (rank 4): not reachable by ssh" in diag.stdout, diag.stdout
    out = tmp_path / "out"
    run = subprocess.run(gptbench("run", "--config", CONFIG, "--hostfile", str(hostfile),
                                  "--set", f"output_dir={out}", "--set", "strategy=dp"),
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and "127.0.0.3" in run.stderr, run.stderr
    assert not (out / "runs").exists()
