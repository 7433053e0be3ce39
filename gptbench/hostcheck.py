"""`gptbench diagnose --hostfile FILE`: can these hosts run one run together, and if not,
exactly what is missing where.

Each host is reached by ssh as pdsh will reach it, and answers with the same small probe
the launching host runs on itself: its Python and package versions, whether the repo and
the working directory exist at the paths the launcher will `cd` into, and the repo's
commit. Any difference from the launching host is a problem line naming the host.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from gptbench.errors import UserError
from gptbench.hostfile import load_layout
from gptbench.multinode import check_launchers, last_line, ssh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("gptbench", "torch", "deepspeed", "transformers")
# Run by the interpreter the ranks will use; standard library only, so a host without the
# packages still answers (with nulls) instead of failing to import them.
PROBE = """
import importlib.metadata as md, json, os, platform, subprocess, sys
root, cwd = sys.argv[1:3]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--verify", "--quiet", "HEAD"],
                            capture_output=True, text=True, timeout=5).stdout.strip() or None
except (OSError, subprocess.TimeoutExpired):
    commit = None
print(json.dumps({"python": platform.python_version(), "commit": commit,
                  "repo": os.path.isfile(os.path.join(root, "launch", "run.py")),
                  "cwd": os.path.isdir(cwd),
                  **{name: version(name) for name in %r}}))
""" % (PACKAGES,)


def probe_command(python: str, root: str, cwd: str) -> str:
    return " ".join(shlex.quote(part) for part in (python, "-c", PROBE, root, cwd))


def local_facts() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, ROOT, os.getcwd()],
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def remote_facts(host: str, env: dict) -> dict | str:
    """The probe's answer from `host`, or a one-line reason it did not answer."""
    result = ssh(host, env, probe_command(sys.executable, ROOT, os.getcwd()))
    if result.returncode == 255:
        return f"not reachable by ssh ({last_line(result.stderr)})"
    if result.returncode == 127:
        return (f"no Python at {sys.executable} (the repo and its .venv must be at the same "
                f"path on every host)")
    try:
        return json.loads(last_line(result.stdout))
    except ValueError:
        return (f"the probe failed (exit {result.returncode}: "
                f"{last_line(result.stderr or result.stdout)})")


def differences(here: dict, there: dict) -> list[str]:
    """What `there` lacks or has differently from `here`, one phrase each."""
    problems = []
    if not there.get("repo"):
        problems.append(f"no gptbench repo at {ROOT} (it must be at the same path on every host)")
    if not there.get("cwd"):
        problems.append(f"no directory {os.getcwd()} (the ranks start in the launching "
                        f"directory)")
    for name in ("python",) + PACKAGES:
        if there.get(name) != here.get(name):
            problems.append(f"{name} {there.get(name) or 'not installed'} there, "
                            f"{here.get(name) or 'not installed'} here")
    if here.get("commit") and there.get("commit") and here["commit"] != there["commit"]:
        problems.append(f"repo at commit {there['commit'][:12]} there, "
                        f"{here['commit'][:12]} here")
    return problems


def check_hosts(report, hostfile: str) -> None:
    """The hosts section of `gptbench diagnose`: one line per host, a problem per gap."""
    layout = load_layout(hostfile)
    env = dict(os.environ)
    port = "a free port per run" if layout.loopback else f"port {layout.master_port}"
    report.section(f"hosts of {layout.hostfile}: {len(layout.hosts)} node(s), "
                   f"{layout.world_size} rank(s); master {layout.master_addr} ({port}); "
                   f"ssh arguments (PDSH_SSH_ARGS_APPEND): "
                   f"{env.get('PDSH_SSH_ARGS_APPEND') or '(none)'}")
    try:
        check_launchers()
    except UserError as e:
        report.problem(str(e).removeprefix("--hostfile: "))
    here = local_facts()
    with ThreadPoolExecutor(max_workers=len(layout.hosts)) as pool:
        answers = list(pool.map(lambda h: remote_facts(h, env), layout.names))
    first = 0
    for (host, slots), there in zip(layout.hosts, answers):
        ranks = f"ranks {first}-{first + slots - 1}" if slots > 1 else f"rank {first}"
        first += slots
        if isinstance(there, str):
            report.problem(f"{host} ({ranks}): {there}")
            continue
        gaps = differences(here, there)
        for gap in gaps:
            report.problem(f"{host} ({ranks}): {gap}")
        if not gaps:
            versions = ", ".join(f"{name} {there[name]}" for name in PACKAGES)
            commit = f" ({there['commit'][:12]})" if there["commit"] else ""
            report.item(f"{host} ({ranks}): ssh ok; python {there['python']}, {versions}; "
                        f"repo at {ROOT}{commit}")
    report.item("the ranks also connect to each other on ephemeral TCP ports (gloo / NCCL): "
                "allow TCP between these hosts, and to the master port")
