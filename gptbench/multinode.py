"""Several hosts through DeepSpeed's own multi-node launcher (`deepspeed --hostfile`).

`gptbench run --hostfile FILE` (and a suite's `hostfile:`) start `deepspeed.launcher.runner`,
which starts pdsh, which starts DeepSpeed's per-node launcher on every host over ssh (the
node rank is pdsh's `%n`); each per-node launcher starts that host's ranks. Around it:

- every host is reached once by ssh first, as pdsh will reach it (`PDSH_SSH_ARGS_APPEND`),
  so an unreachable host is one line and exit 2 before anything starts;
- `--master_addr` is always given (the first host of the hostfile): without it DeepSpeed
  asks the first host for `hostname -I`;
- the ranks' environment travels the way DeepSpeed forwards it, a `.deepspeed_env` file
  (named by DS_ENV_FILE): GLOO_SOCKET_IFNAME (`lo` when every host is loopback), the
  Hugging Face offline switches, GPTBENCH_FAULT, and the host names (GPTBENCH_HOSTS), so
  each rank records which host it ran on.

Rank side (worker): a rank dies with its per-node launcher, and reports its host and the
addresses its TCP connections used.
"""
from __future__ import annotations

import ctypes
import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from gptbench import results
from gptbench.errors import UserError
from gptbench.hostfile import Layout

HOSTS_ENV = "GPTBENCH_HOSTS"  # the hostfile's hosts in node order, for the ranks
# What the ranks need from the launching environment besides what DeepSpeed already
# forwards (PYTHON*, and NCCL* on CUDA): socket interfaces, offline switches, faults. Named
# one by one where a prefix would carry secrets (HF_TOKEN): the exports travel on pdsh's
# command line and into the run's log.
FORWARD_PREFIXES = ("GLOO_", "NCCL_", "GPTBENCH_")
FORWARD_NAMES = ("TP_SOCKET_IFNAME", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
                 "CUDA_DEVICE_ORDER")
CONNECT_TIMEOUT_S = 10
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ssh_command(host: str, env: dict, remote: str) -> list[str]:
    """ssh to `host` the way pdsh's ssh module does (`-a -x -l USER`, then
    PDSH_SSH_ARGS_APPEND), never prompting."""
    return (["ssh", "-a", "-x", "-l", getpass.getuser()]
            + shlex.split(env.get("PDSH_SSH_ARGS_APPEND", ""))
            + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}", host, remote])


def ssh(host: str, env: dict, remote: str) -> subprocess.CompletedProcess:
    """Run `remote` on `host`; an ssh that cannot start or hangs is a failed result."""
    try:
        return subprocess.run(ssh_command(host, env, remote), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=CONNECT_TIMEOUT_S + 20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess([], 255, "", f"ssh: {e}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def check_launchers() -> None:
    """The programs the launching host needs: pdsh (DeepSpeed's default multi-node
    launcher) and ssh (which pdsh runs)."""
    for program, package in (("pdsh", "pdsh"), ("ssh", "openssh-client")):
        if shutil.which(program) is None:
            raise UserError(f"--hostfile: {program} is not installed on this machine "
                            f"(Debian/Ubuntu: apt-get install {package})")


def preflight(layout: Layout, env: dict) -> None:
    """Every host answers over ssh as pdsh will reach it, or UserError naming each that
    does not (with ssh's own reason)."""
    check_launchers()
    with ThreadPoolExecutor(max_workers=len(layout.hosts)) as pool:
        done = list(pool.map(lambda h: (h, ssh(h, env, "true")), layout.names))
    failed = [f"{host} ({last_line(r.stderr)})" for host, r in done if r.returncode != 0]
    if failed:
        raise UserError(f"--hostfile {layout.hostfile}: not reachable by ssh: "
                        f"{'; '.join(failed)}; see: gptbench diagnose --hostfile "
                        f"{layout.hostfile}")


def user_env_files(env: dict) -> list[str]:
    """The `.deepspeed_env` files DeepSpeed's runner would read itself (home, then the
    working directory): their settings are kept in the file gptbench writes."""
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    paths = [os.path.join(os.path.expanduser("~"), name), os.path.join(os.getcwd(), name)]
    return list(dict.fromkeys(p for p in paths if os.path.isfile(p)))


def rank_env(layout: Layout, env: dict) -> dict[str, str]:
    """The variables every rank on every host gets through `.deepspeed_env`."""
    out: dict[str, str] = {}
    for path in user_env_files(env):
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key:
                    out[key.strip()] = value.strip()
    out.update({k: v for k, v in env.items()
                if k.startswith(FORWARD_PREFIXES) or k in FORWARD_NAMES})
    if "GPTBENCH_FAULT" not in env:
        out.pop("GPTBENCH_FAULT", None)  # a fault is this run's choice, not a file's
    if layout.loopback:
        # Gloo binds the address of this machine's hostname unless told an interface, and
        # a hostname may resolve to a non-loopback address (it does on many machines).
        out.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out[HOSTS_ENV] = ",".join(layout.names)
    return {k: v for k, v in out.items() if "\n" not in v}


def write_env_file(path: str, variables: dict[str, str]) -> str:
    results.write_atomic(path, "".join(f"{k}={v}\n" for k, v in variables.items()).encode())
    return path


def free_port() -> int:
    """A TCP port free on this machine now, for a master port (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(layout: Layout, entry: str, config_path: str | None, overrides: list[str],
                   output_dir: str, run_id: str, env: dict) -> tuple[list[str], dict]:
    """(DeepSpeed runner command, its environment) for one run over the layout's hosts,
    after every host answered by ssh; writes the run's `.deepspeed_env`."""
    preflight(layout, env)
    env_file = write_env_file(
        os.path.join(os.path.abspath(output_dir), "runs", ".ranks", f"{run_id}.deepspeed_env"),
        rank_env(layout, env))
    return (runner_command(layout, entry, config_path, overrides),
            {**env, "DS_ENV_FILE": env_file, "PDSH_RCMD_TYPE": "ssh"})


def runner_command(layout: Layout, entry: str, config_path: str | None,
                   overrides: list[str]) -> list[str]:
    """`deepspeed --hostfile ...` as a module call, with the master address always given.

    `--no_ssh_check`: DeepSpeed's own check runs a plain `ssh FIRST_HOST hostname`, without
    PDSH_SSH_ARGS_APPEND (port, key), and only for the first host; `preflight` reaches
    every host with pdsh's arguments instead."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner",
           f"--hostfile={layout.hostfile}", "--launcher=pdsh", "--no_ssh_check",
           f"--master_addr={layout.master_addr}", f"--master_port={layout.master_port}", entry]
    if config_path:
        cmd += ["--config", os.path.abspath(config_path)]  # as the other hosts see it
    for pair in overrides:
        cmd += ["--set", pair]
    return cmd


def annotate(record: dict, layout: Layout, path: str) -> dict:
    """Hosts and node count in a record the ranks did not finish (the launcher knows the
    placement from the hostfile), and the host of the failed rank."""
    topology = record.setdefault("topology", {})
    changed = False
    if topology.get("hosts") is None:
        topology["hosts"], changed = layout.rank_hosts(), True
    if topology.get("nodes") is None:
        topology["nodes"], changed = len(layout.hosts), True
    rank = record.get("failed_rank")
    if record.get("status") != "ok" and rank is not None and rank < len(topology["hosts"]):
        host = topology["hosts"][rank]
        record["failed_host"] = host
        record["error"] = f"{record.get('error')} [rank {rank} ran on {host}]"
        changed = True
    if changed:
        results.write_json_atomic(path, record)
    return record


# --- rank side -------------------------------------------------------------------------

def die_with_launcher() -> None:
    """Under DeepSpeed's per-node launcher (it sets CROSS_RANK), this rank is killed when
    that launcher dies, even by SIGKILL. Otherwise the ranks of a host whose launcher died
    live on, orphaned, on a machine nothing else watches; a hung one for ever."""
    if "CROSS_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here: the launcher's own teardown still applies
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def rank_host() -> str:
    """The host this rank runs on, as the hostfile names it; the hostname otherwise."""
    names = [n for n in os.environ.get(HOSTS_ENV, "").split(",") if n]
    node = os.environ.get("CROSS_RANK", "")
    if node.isdigit() and int(node) < len(names):
        return names[int(node)]
    return socket.gethostname()


def tcp_addresses() -> list[str]:
    """The IP addresses at both ends of this process's established TCP connections: where
    its process groups (gloo pairs, NCCL bootstrap, the rendezvous store) talk."""
    import psutil

    conns = psutil.Process().net_connections(kind="tcp")
    return sorted({end.ip for c in conns if c.status == psutil.CONN_ESTABLISHED
                   for end in (c.laddr, c.raddr) if end})


def rank_facts() -> dict:
    return {"host": rank_host(), "comm_addresses": tcp_addresses()}


def placement(ranks: list[dict]) -> dict:
    """topology.{nodes, hosts, comm_addresses} from the ranks' facts (sorted by rank)."""
    hosts = [r["host"] for r in ranks]
    nodes = os.environ.get("CROSS_SIZE", "")
    return {"nodes": int(nodes) if nodes.isdigit() else len(set(hosts)), "hosts": hosts,
            "comm_addresses": [r["comm_addresses"] for r in ranks]}
