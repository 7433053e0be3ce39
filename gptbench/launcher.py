"""Run one configuration as its own `deepspeed` launcher process and always end with a record.

The config is validated here first (bad input: exit 2, nothing started, nothing written).
The launcher runs in its own process group, so a timeout or Ctrl-C ends every rank; when
the ranks did not write a finished record, one is composed from what the ranks left:
`failed`/`oom` with the failing rank, or `timeout`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

from gptbench import results
from gptbench.config import load_config
from gptbench.errors import NotApplicable
from gptbench.runplan import resolve, run_id_for
from gptbench.worker import error_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "launch", "run.py")
# A peer's message when it gave up waiting in a collective for a rank that went silent.
WAITING = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|peer", re.I)


def deepspeed_command(config_path: str | None, overrides: list[str], world: int) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(exe):
        exe = shutil.which("deepspeed") or exe
    from gptbench.worker import _free_port

    cmd = [exe, "--num_gpus", str(world), "--master_port", str(_free_port()), ENTRY]
    if config_path:
        cmd += ["--config", config_path]
    for pair in overrides:
        cmd += ["--set", pair]
    return cmd


def prepare(config_path: str | None, overrides: list[str], ranks: int | None = None):
    """(cfg, world, run_id, not_applicable_reason): validation before anything starts."""
    cfg = load_config(config_path, overrides)
    world = ranks or cfg.topology.world_size or 1
    try:
        plan = resolve(cfg, world)
        return cfg, world, plan.run_id, None
    except NotApplicable as e:
        return cfg, world, run_id_for(cfg, world), str(e)


def run(config_path: str | None, overrides: list[str], ranks: int | None = None,
        log_path: str | None = None, env: dict | None = None) -> dict:
    """Launch one configuration; returns its record (also written under output_dir/runs)."""
    cfg, world, run_id, na_reason = prepare(config_path, overrides, ranks)
    path = results.run_path(cfg.output_dir, run_id)
    overrides = list(overrides) + [f"run_id={run_id}"]
    if na_reason:
        record = results.skeleton(cfg, world)
        record.update(run_id=run_id, status="not_applicable", error=na_reason)
        record["null_reasons"]["metrics"] = "not applicable: " + na_reason
        results.write_json_atomic(path, record)
        return record
    _clear_previous(cfg.output_dir, run_id, world)
    cmd = deepspeed_command(config_path, overrides, world)
    started = time.time()
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    proc = subprocess.Popen(cmd, stdout=log or None, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True, env={**os.environ, **(env or {})})
    timed_out = False
    try:
        proc.wait(timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc)
    except BaseException:
        stop(proc)
        raise
    finally:
        if log:
            log.close()
    return finalize(cfg, run_id, world, proc.returncode, timed_out, time.time() - started)


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the launcher's whole process group, SIGKILL after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _clear_previous(output_dir: str, run_id: str, world: int) -> None:
    """A rerun of a run_id replaces its record; the old one is kept under runs/.previous."""
    path = results.run_path(output_dir, run_id)
    if os.path.exists(path):
        keep = os.path.join(output_dir, "runs", ".previous")
        os.makedirs(keep, exist_ok=True)
        os.replace(path, os.path.join(keep, f"{run_id}.{int(time.time())}.json"))
    for rank in range(world):
        if os.path.exists(error_path(output_dir, run_id, rank)):
            os.unlink(error_path(output_dir, run_id, rank))


def _rank_errors(output_dir: str, run_id: str, world: int) -> dict[int, dict]:
    import json

    out = {}
    for rank in range(world):
        try:
            with open(error_path(output_dir, run_id, rank), encoding="utf-8") as f:
                out[rank] = json.load(f)
        except (OSError, ValueError):
            continue
    return out


def blame(errors: dict[int, dict], world: int) -> tuple[int | None, str, str]:
    """(failing rank, status, one-line error) from what the ranks reported."""
    causes = {r: e for r, e in errors.items() if not WAITING.search(e["error"])}
    if causes:
        rank = min(causes)
        return rank, causes[rank]["status"], f"rank {rank}: {causes[rank]['error']}"
    silent = [r for r in range(world) if r not in errors]
    if errors and silent:
        waiter = min(errors)
        return (silent[0], "failed",
                f"rank {silent[0]} stopped responding; rank {waiter} gave up waiting for it: "
                f"{errors[waiter]['error']}")
    if errors:
        rank = min(errors)
        return rank, errors[rank]["status"], f"rank {rank}: {errors[rank]['error']}"
    return None, "failed", "no rank reported an error"


def finalize(cfg, run_id: str, world: int, returncode: int | None, timed_out: bool,
             wall_s: float) -> dict:
    path = results.run_path(cfg.output_dir, run_id)
    record = results.read_record(path)
    if record is not None and record.get("status") == "ok" and not timed_out:
        return record
    errors = _rank_errors(cfg.output_dir, run_id, world)
    if record is None or record.get("status") == "ok":
        record = results.skeleton(cfg, world)
        record["run_id"] = run_id
    if timed_out:
        record.update(status="timeout", failed_rank=None,
                      error=f"the run exceeded timeout_s={cfg.timeout_s:g} s and was stopped")
    else:
        rank, status, line = blame(errors, world)
        if not errors:
            line = f"the launcher exited with code {returncode} and {line}"
        record.update(status=status, failed_rank=rank, error=line)
    record["wall_s"] = wall_s
    record["null_reasons"]["metrics"] = f"the run did not finish ({record['status']})"
    if any(e.get("cuda_memory") for e in errors.values()):
        record["memory_at_failure"] = {r: e["cuda_memory"] for r, e in errors.items()
                                       if e.get("cuda_memory")}
    results.write_json_atomic(path, record)
    return record

