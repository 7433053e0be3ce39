"""The multi-node path's parts that need no second host: hostfile reading, the layout and
the runner command, what the ranks get through .deepspeed_env, the loopback audit, a rank
dying with its launcher, the host checks' comparison, and the suite's `hostfile:` key.
The end-to-end runs over ssh are tests/integration/test_multinode.py (`make test-multinode`)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from gptbench import hostcheck, multinode
from gptbench.errors import UserError
from gptbench.hostfile import (
    DEFAULT_MASTER_PORT,
    ephemeral_low,
    load_layout,
    non_loopback,
    read_hostfile,
)
from gptbench.report.render import grid_text
from gptbench.suite import load_suite
from paths import ROOT
from paths import TINY_CPU as CONFIG


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_hostfile_lines_in_node_order_comments_skipped(tmp_path):
    path = write(tmp_path / "hosts", """\
        # two servers
        worker-1 slots=4

        worker-0 slots=2   # trailing text, as DeepSpeed allows
        """)
    assert read_hostfile(path) == (("worker-1", 4), ("worker-0", 2))


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots=2\nworker-1\n", "hosts:2: expected 'HOST slots=N', got 'worker-1'"),
    ("worker-0 slots=2\nworker-0 slots=2\n", "hosts:2: host worker-0 is listed twice"),
    ("worker-0 slots=0\n", "hosts:1: worker-0 has slots=0"),
    ("# nothing\n\n", "hosts: no hosts"),
])
def test_a_bad_hostfile_names_file_and_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        read_hostfile(write(tmp_path / "hosts", text))


def test_bad_hostfile_on_the_command_line_is_exit_2_and_one_line(tmp_path):
    hosts = write(tmp_path / "hosts", "127.0.0.1 slots=2\n127.0.0.2 slots=two\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "gptbench.cli", "run", "--config", CONFIG, "--hostfile", hosts,
         "--set", f"output_dir={out}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gptbench: error: {hosts}:2: expected 'HOST slots=N', got '127.0.0.2 slots=two'"]
    assert not out.exists()


def test_ranks_must_match_the_slots(tmp_path):
    hosts = write(tmp_path / "hosts", "127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    with pytest.raises(UserError, match=r"--ranks=2, but .* has 4 slot\(s\) \(127.0.0.1: 2, "):
        load_layout(hosts, ranks=2)


def test_layout_numbers_ranks_node_by_node_and_master_is_the_first_host(tmp_path):
    layout = load_layout(write(tmp_path / "hosts", "127.0.0.1 slots=2\n127.0.0.2 slots=2\n"))
    assert layout.world_size == 4 and layout.loopback
    assert layout.rank_hosts() == ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"]
    assert layout.master_addr == "127.0.0.1"
    # a port the kernel never hands out implicitly (busy machines took ephemeral ones)
    assert 1024 <= layout.master_port < ephemeral_low()
    remote = load_layout(write(tmp_path / "real", "gpu-a slots=4\ngpu-b slots=4\n"))
    assert not remote.loopback
    assert (remote.master_addr, remote.master_port) == ("gpu-a", DEFAULT_MASTER_PORT)


def test_runner_command_always_names_the_master(tmp_path):
    layout = load_layout(write(tmp_path / "hosts", "gpu-a slots=2\ngpu-b slots=2\n"))
    cmd = multinode.runner_command(layout, "/repo/launch/run.py", "cfg.yaml", ["strategy=tp"])
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    # without --master_addr DeepSpeed asks the first host for `hostname -I`
    assert "--master_addr=gpu-a" in cmd and "--master_port=29500" in cmd
    assert "--no_ssh_check" in cmd and "--launcher=pdsh" in cmd
    assert cmd[-5:] == ["/repo/launch/run.py", "--config", os.path.abspath("cfg.yaml"),
                        "--set", "strategy=tp"]


def test_rank_env_forwards_interfaces_offline_and_fault_and_keeps_user_files(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    write(home / ".deepspeed_env", "NCCL_IB_DISABLE=1\nGPTBENCH_FAULT=rank=0,at=load,kind=crash\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    loop = load_layout(write(tmp_path / "hosts", "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/bin", "GPTBENCH_FAULT": "rank=1,at=decode,kind=hang"}
    got = multinode.rank_env(loop, env)
    assert got == {"NCCL_IB_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                   "GPTBENCH_FAULT": "rank=1,at=decode,kind=hang",
                   "GLOO_SOCKET_IFNAME": "lo", "GPTBENCH_HOSTS": "127.0.0.1,127.0.0.2"}
    # no fault in this run's environment: the file's stale one does not reach the ranks
    assert "GPTBENCH_FAULT" not in multinode.rank_env(loop, {"PATH": "/bin"})
    real = load_layout(write(tmp_path / "real", "gpu-a slots=1\ngpu-b slots=1\n"))
    assert multinode.rank_env(real, {"GLOO_SOCKET_IFNAME": "eth1"})["GLOO_SOCKET_IFNAME"] == "eth1"
    assert "GLOO_SOCKET_IFNAME" not in multinode.rank_env(real, {})


def test_loopback_audit():
    assert non_loopback(["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "localhost"]) == []
    assert non_loopback(["127.0.0.1", "192.0.2.2", "::ffff:10.0.0.7", "fd00::2"]) == [
        "192.0.2.2", "::ffff:10.0.0.7", "fd00::2"]


def test_tcp_addresses_are_this_process_connections():
    with socket.create_server(("127.0.0.2", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        try:
            assert {"127.0.0.2"} <= set(multinode.tcp_addresses())
        finally:
            client.close()
            peer.close()


def test_placement_counts_nodes(monkeypatch):
    ranks = [{"host": h, "comm_addresses": ["127.0.0.1"]} for h in ("a", "a", "b", "b")]
    monkeypatch.delenv("CROSS_SIZE", raising=False)
    assert multinode.placement(ranks)["nodes"] == 2
    monkeypatch.setenv("CROSS_SIZE", "3")  # DeepSpeed's launcher knows better than names
    assert multinode.placement(ranks) == {"nodes": 3, "hosts": ["a", "a", "b", "b"],
                                          "comm_addresses": [["127.0.0.1"]] * 4}


def test_rank_host_is_the_hostfile_name_of_its_node(monkeypatch):
    monkeypatch.setenv(multinode.HOSTS_ENV, "127.0.0.1,127.0.0.2")
    monkeypatch.setenv("CROSS_RANK", "1")
    assert multinode.rank_host() == "127.0.0.2"
    monkeypatch.delenv(multinode.HOSTS_ENV)
    assert multinode.rank_host() == socket.gethostname()


CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from gptbench.multinode import die_with_launcher
die_with_launcher()
print(os.getpid(), flush=True)
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout)
time.sleep(60)
"""
# Runs parent (the launcher) and child (a rank), SIGKILLs the parent and says whether the
# child died. It is the child's subreaper, so the orphan is reaped here, not left a zombie.
REAPER = """
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
parent = subprocess.Popen([sys.executable, "-c", {parent!r}], stdout=subprocess.PIPE, text=True)
child = int(parent.stdout.readline())
parent.kill()
parent.wait()
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        if os.waitpid(child, os.WNOHANG)[0]:
            print("died")
            sys.exit(0)
    except ChildProcessError:  # not yet handed to us
        pass
    time.sleep(0.1)
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
print("survived")
"""


@pytest.mark.parametrize("under_deepspeed", [True, False])
def test_a_rank_dies_with_its_launcher(under_deepspeed):
    env = {k: v for k, v in os.environ.items() if k != "CROSS_RANK"}
    if under_deepspeed:
        env["CROSS_RANK"] = "0"  # what DeepSpeed's per-node launcher sets
    script = REAPER.format(parent=PARENT.format(child=CHILD.format(root=ROOT)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.stdout.strip() == ("died" if under_deepspeed else "survived"), result.stderr


def test_failed_record_gets_hosts_and_the_failed_host(tmp_path):
    layout = load_layout(write(tmp_path / "hosts", "127.0.0.1 slots=2\n127.0.0.2 slots=2\n"))
    path = tmp_path / "run.json"
    record = {"status": "failed", "error": "rank 3: RuntimeError: boom", "failed_rank": 3,
              "topology": {"world_size": 4}}
    multinode.annotate(record, layout, str(path))
    saved = json.loads(path.read_text())
    assert saved["failed_host"] == "127.0.0.2"
    assert saved["topology"]["nodes"] == 2 and saved["topology"]["hosts"][3] == "127.0.0.2"
    assert saved["error"] == "rank 3: RuntimeError: boom [rank 3 ran on 127.0.0.2]"


def test_host_check_names_each_difference():
    here = {"python": "3.11.7", "gptbench": "0.1.0", "torch": "2.13.0", "deepspeed": "0.19.8",
            "transformers": "5.24.0", "commit": "a" * 40, "repo": True, "cwd": True}
    assert hostcheck.differences(here, dict(here)) == []
    there = {**here, "repo": False, "deepspeed": None, "torch": "2.12.0", "commit": "b" * 40}
    assert hostcheck.differences(here, there) == [
        f"no gptbench repo at {hostcheck.ROOT} (it must be at the same path on every host)",
        "torch 2.12.0 there, 2.13.0 here",
        "deepspeed not installed there, 0.19.8 here",
        f"repo at commit {'b' * 12} there, {'a' * 12} here"]


def test_host_probe_runs_here():
    facts = hostcheck.local_facts()
    assert facts["repo"] and facts["cwd"] and facts["deepspeed"] and facts["torch"]


def test_suite_hostfile_key(tmp_path):
    write(tmp_path / "hosts", "127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    suite = write(tmp_path / "suite.yaml", f"""\
        base: {CONFIG}
        hostfile: hosts
        runs:
          - {{id: tp, set: {{strategy: tp}}}}
          - {{id: pp, ranks: 4, set: {{strategy: pp}}}}
        """)
    loaded = load_suite(suite)
    assert loaded.hostfile == str(tmp_path / "hosts")
    assert [r.ranks for r in loaded.runs] == [4, 4]
    bad = write(tmp_path / "bad.yaml", f"base: {CONFIG}\nhostfile: hosts\nruns: [{{id: x, ranks: 2}}]\n")
    with pytest.raises(UserError, match=r"runs\[0\]: ranks=2, but the suite's hostfile .* has 4"):
        load_suite(bad)


def test_report_grid_shows_nodes():
    topology = {"dp": 2, "tp": 2, "pp": 1, "micro_batches": 1}
    assert grid_text({"topology": {**topology, "nodes": 2}}) == "dp2 tp2 pp1 on 2 nodes"
    assert grid_text({"topology": {**topology, "nodes": 1}}) == "dp2 tp2 pp1"
    assert grid_text({"topology": topology}) == "dp2 tp2 pp1"
