"""Run one configuration under DeepSpeed's launcher, in its own process group, and always
end with a record.

The config, the dataset and GPTBENCH_FAULT are validated here first (bad input: exit 2,
nothing started, nothing written). The launcher runs in its own process group, so a
timeout or Ctrl-C ends every rank, and no rank outlives `run`. When the ranks did not write
a finished record, one is composed from what the ranks left: `failed`/`oom` with the
failing rank, or `timeout`. An interrupted run leaves no record (a rerun or `--resume`
runs it again).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from gptbench import faults, limits, multinode, progress, results
from gptbench.config import RunConfig, load_config, set_pair
from gptbench.errors import NotApplicable, UserError
from gptbench.hostfile import load_layout
from gptbench.progress import ROW_MARKER
from gptbench.rankwatch import POLL_S, RankWatch, watchdog_error
from gptbench.results import error_path
from gptbench.runplan import check_output_dir, resolve, run_id_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "launch", "run.py")
# A peer's message when it gave up waiting in a collective for a rank that went silent.
WAITING = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|peer", re.I)
# Gloo prefixes its messages with its source location: noise in a one-line error.
SOURCE_LOCATION = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*")
GRACE_S = 10.0  # SIGTERM to SIGKILL
# What every rank gets unless the caller's environment says otherwise. CUDA numbers GPUs
# fastest first, NVML and nvidia-smi by PCI bus: on a machine with mixed GPUs cuda:1 would
# not be NVML's GPU 1 (the utilisation sampler would read another card), nor what
# CUDA_VISIBLE_DEVICES=1 means to someone reading nvidia-smi.
RANK_ENV_DEFAULTS = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def rank_environment(env: dict) -> dict:
    """`env` with RANK_ENV_DEFAULTS filled in where it has none."""
    return {**RANK_ENV_DEFAULTS, **env}


def deepspeed_command(config_path: str | None, overrides: list[str], world: int,
                      visible_gpus: str | None = None) -> list[str]:
    """DeepSpeed's per-node launcher, `deepspeed.launcher.launch`, called as the `deepspeed`
    command calls it on one machine. Calling it directly saves that command's own process
    (~5 s of imports before any rank starts) and its handling of CUDA_VISIBLE_DEVICES."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("DeepSpeed is not installed in this Python; run: make install")
    hosts = {"localhost": device_ids(world, visible_gpus)}
    world_info = base64.urlsafe_b64encode(json.dumps(hosts).encode("utf-8")).decode("ascii")
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
           "--master_addr=127.0.0.1", f"--master_port={multinode.free_port()}", ENTRY]
    if config_path:
        cmd += ["--config", config_path]
    for pair in overrides:
        cmd += ["--set", pair]
    return cmd


def device_ids(world: int, visible_gpus: str | None) -> list:
    """The device of each local rank; the launcher sets CUDA_VISIBLE_DEVICES to them.

    The `deepspeed` command with `--num_gpus` drops CUDA_VISIBLE_DEVICES and takes GPUs
    0..N-1; here the GPUs the user made visible are the ones used."""
    ids = [d.strip() for d in (visible_gpus or "").split(",") if d.strip()]
    if not ids:
        return list(range(world))
    if len(ids) < world:
        raise UserError(f"CUDA_VISIBLE_DEVICES={visible_gpus} shows {len(ids)} GPU(s), but "
                        f"this run has {world} ranks")
    return [int(d) if d.isdigit() else d for d in ids[:world]]


@dataclass(frozen=True)
class Prepared:
    cfg: RunConfig
    world: int
    run_id: str
    not_applicable: str | None  # the reason, when the grid cannot be formed
    device_type: str | None     # cpu / cuda; None when not applicable


def prepare(config_path: str | None, overrides: list[str], ranks: int | None = None,
            fault_spec: str | None = None, on_hosts: bool = False) -> Prepared:
    """Everything checked before anything starts; UserError (exit 2) for bad input.

    `fault_spec` (GPTBENCH_FAULT) is checked against this run's ranks when given.
    `on_hosts`: the ranks are a hostfile's slots (checked there), not processes here."""
    if ranks is not None and ranks < 1:
        raise UserError(f"--ranks: must be positive, got {ranks}")
    cfg = load_config(config_path, overrides)
    world = ranks or cfg.topology.world_size or 1
    if not on_hosts:
        limits.check_local_ranks("--ranks" if ranks else "topology.world_size", world)
    fault = faults.parse(fault_spec)
    if fault is not None and fault.rank >= world:
        raise UserError(f"{faults.ENV}: rank={fault.rank}, but this run has {world} rank(s) "
                        f"(0..{world - 1})")
    try:
        plan = resolve(cfg, world)
    except NotApplicable as e:
        check_output_dir(cfg.output_dir)  # a suite records the row there
        return Prepared(cfg, world, run_id_for(cfg, world), str(e), None)
    check_dataset(cfg, plan.model_dims["vocab_size"], plan.grid.dp)
    check_output_dir(cfg.output_dir)
    return Prepared(cfg, world, plan.run_id, None, plan.device_type)


def check_dataset(cfg, vocab_size: int, dp: int) -> None:
    """Read the whole dataset once here, so a bad line is exit 2 naming `file:line`, not a
    failed run: token ids within the vocabulary, prompts readable by the model's tokenizer."""
    from gptbench import datasets
    from gptbench.runplan import holds_token_ids, workload_samples

    path = cfg.workload.dataset
    if path is None:
        return
    if holds_token_ids(path):
        workload_samples(cfg, vocab_size, dp)  # names file:line of a bad id; enough samples
        return
    datasets.load_prompts(path)  # names file:line before the tokenizer is looked for
    try:
        workload_samples(cfg, vocab_size, dp)
    except (OSError, ValueError) as e:  # the tokenizer of model.name cannot be loaded
        raise UserError(f"workload.dataset: {path} holds prompts, but the tokenizer of "
                        f"model.name '{cfg.model.name}' cannot be loaded "
                        f"({str(e).splitlines()[0][:200]}); use a token-id samples file "
                        f"(gptbench datasets make)") from None


def run(config_path: str | None, overrides: list[str], ranks: int | None = None,
        log_path: str | None = None, env: dict | None = None,
        check_fault_rank: bool = True, progress_position: int | None = None,
        hostfile: str | None = None, refuse_not_applicable: bool = False) -> dict:
    """Launch one configuration; returns its record (also written under output_dir/runs).

    `check_fault_rank=False` (suites) lets GPTBENCH_FAULT name a rank this run lacks.
    `hostfile`: run on its hosts through DeepSpeed's multi-node launcher (multinode.py).
    `refuse_not_applicable` (a single `gptbench run`): a grid that cannot be formed is bad
    input (UserError, nothing written); a suite records it as `not_applicable` instead."""
    env = rank_environment({**os.environ, **(env or {})})
    fault_spec = env.get(faults.ENV) or None
    faults.parse(fault_spec)
    layout = load_layout(hostfile, ranks) if hostfile else None
    ranks = layout.world_size if layout else ranks
    p = prepare(config_path, overrides, ranks, fault_spec if check_fault_rank else None,
                on_hosts=layout is not None)
    cfg, world, run_id = p.cfg, p.world, p.run_id
    path = results.run_path(cfg.output_dir, run_id)
    if p.not_applicable and refuse_not_applicable:
        raise UserError(f"{run_id}: not applicable: {p.not_applicable}")
    if p.not_applicable:
        record = results.not_applicable(cfg, world, run_id, p.not_applicable)
        results.write_json_atomic(path, record)
        return record
    env[progress.ENV] = os.path.join(cfg.output_dir, "runs", ".ranks", f"{run_id}.progress")
    try:
        if layout:  # before the command: the multi-node path forwards the environment as is
            cmd, env = multinode.launch_command(layout, ENTRY, config_path, list(overrides) + [
                set_pair("run_id", run_id)], cfg.output_dir, run_id, env)
        else:
            visible = env.get("CUDA_VISIBLE_DEVICES") if p.device_type == "cuda" else None
            cmd = deepspeed_command(config_path, list(overrides) + [set_pair("run_id", run_id)],
                                    world, visible)
        _clear_previous(cfg.output_dir, run_id, world)
        started = time.time()
        log = open(log_path, "wb") if log_path else None
    except OSError as e:  # after the checks, before any rank: still a record, in one line
        return not_started(cfg, world, run_id, e)
    # The output passes through the watch (to the log or the console): it is where torch's
    # NCCL watchdog says which collective timed out before it aborts a rank.
    watch = RankWatch(ENTRY, world, sink=log)
    proc = None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        watch.follow(proc.stdout)
        with progress.watch(env[progress.ENV], run_id, position=progress_position):
            timed_out = not watch.wait(proc, cfg.timeout_s)
        stop(proc)  # also after a normal exit: no rank outlives its launcher
        watch.close()
    except BaseException:  # Ctrl-C, SIGTERM: stop the ranks, drop the partial record
        if proc is not None:
            stop(proc)
            watch.close()
        drop_unfinished(path)
        raise
    finally:
        if proc is not None:
            proc.stdout.close()
        if log:
            log.close()
    record = finalize(cfg, run_id, world, proc.returncode, timed_out, time.time() - started,
                      watch)
    return multinode.annotate(record, layout, path) if layout else record


@dataclass(frozen=True)
class Row:
    """One configuration of a grouped launch: its overrides (with output_dir and run_id)."""
    run_id: str
    overrides: tuple[str, ...]
    log_path: str | None = None


class RowLogs:
    """The launch's output, split into one log per row at rank 0's row markers; also when
    each row started. The launch's start-up (its command, master address, environment:
    what comes before the first marker) opens every row's log, so each log stands alone."""

    PREAMBLE_BYTES = 1 << 16

    def __init__(self, rows: list[Row], on_row=None):
        self.rows = {r.run_id: r for r in rows}
        self.current, self.started = rows[0].run_id, time.monotonic()
        self.on_row, self.pending, self.file = on_row, b"", None
        self.preamble, self.in_preamble = b"", True
        self._open(rows[0])

    def _open(self, row: Row) -> None:
        if self.file is not None:
            self.file.close()
        self.file = open(row.log_path, "wb") if row.log_path else None
        if self.file is not None and not self.in_preamble:
            self.file.write(self.preamble)

    def write(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            at = text.find(ROW_MARKER)
            if at >= 0:
                self.in_preamble = False
                run_id = text[at + len(ROW_MARKER):].split(" ", 1)[0]
                if run_id in self.rows and run_id != self.current:
                    self.current, self.started = run_id, time.monotonic()
                    self._open(self.rows[run_id])
                    if self.on_row is not None:
                        self.on_row(run_id)
            if self.in_preamble and len(self.preamble) < self.PREAMBLE_BYTES:
                self.preamble += line + b"\n"
            self._emit(line + b"\n")

    def _emit(self, data: bytes) -> None:
        if self.file is not None:
            self.file.write(data)
        else:
            sys.stdout.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        (self.file or sys.stdout).flush()

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = b""
        if self.file is not None:
            self.file.close()
            self.file = None


def run_rows(config_path: str | None, rows: list[Row], ranks: int, env: dict | None = None,
             progress_position: int | None = None, hostfile: str | None = None,
             on_record=None) -> list[dict]:
    """Run consecutive rows of one rank count in as few launches as failures allow.

    The rows run one after the other in the same ranks (launch/run.py --sweep), each with
    its own record, log, compile, memory peak and timeout_s (from its own start; the
    first row's includes the launch's start-up). A row that fails, times out or is killed
    ends its launch; the rows after it start again in a fresh one. A not-applicable row is
    recorded without starting anything. `on_record(record)` is called as each row ends.
    Ctrl-C / SIGTERM: the ranks are stopped, unfinished records dropped, the signal raised."""
    env = {**os.environ, **(env or {})}
    layout = load_layout(hostfile, ranks) if hostfile else None
    ranks = layout.world_size if layout else ranks
    done, pending = [], list(rows)

    def record(p: Prepared, r: dict | None = None) -> None:
        if r is None:  # not applicable: nothing to start, recorded in its turn
            r = results.not_applicable(p.cfg, p.world, p.run_id, p.not_applicable)
            results.write_json_atomic(results.run_path(p.cfg.output_dir, p.run_id), r)
        done.append(r)
        if on_record:
            on_record(r)

    while pending:
        batch, after = [], {}  # after: run_id -> the not-applicable rows that follow it
        for row in pending:
            p = prepare(config_path, list(row.overrides), ranks, on_hosts=layout is not None)
            if p.not_applicable and batch:  # the rows around it still share a launch
                after.setdefault(batch[-1][0].run_id, []).append((row, p))
            elif p.not_applicable:
                record(p)
            else:
                batch.append((row, p))
        if not batch:
            break
        told = set()  # rows already reported while their launch went on

        def ended(row: Row, p: Prepared, r: dict, told=told, after=after) -> None:
            told.add(row.run_id)
            record(p, r)
            for _, na in after.get(row.run_id, []):
                record(na)

        finished = _launch_rows(config_path, batch, env, progress_position, layout, ended)
        for (row, p), r in zip(batch, finished):
            if row.run_id not in told:
                ended(row, p, r)
        last = batch[len(finished) - 1][0]
        last = (after.get(last.run_id) or [(last, None)])[-1][0]
        pending = pending[pending.index(last) + 1:]  # after a failure: a fresh launch
    return done


def _launch_rows(config_path, batch, env: dict, progress_position, layout,
                 ended=None) -> list[dict]:
    """One launch of `batch` ([(Row, Prepared)]); the records of the rows it finished, up
    to and including the first that did not finish ok (composed here when needed).
    `ended(row, prepared, record)` is called, from the output's thread, for each row seen
    finished ok while the launch goes on (the next row has started)."""
    rows = [r for r, _ in batch]
    first = batch[0][1]
    out_dir, world = first.cfg.output_dir, first.world
    ranks_dir = os.path.join(out_dir, "runs", ".ranks")
    try:
        os.makedirs(ranks_dir, exist_ok=True)
        sweep = os.path.abspath(os.path.join(ranks_dir, f"{rows[0].run_id}.sweep.yaml"))
        import yaml

        with open(sweep, "w", encoding="utf-8") as f:
            yaml.safe_dump({"runs": [list(r.overrides) for r in rows]}, f)
        env = {**env, progress.ENV: os.path.join(ranks_dir, f"{rows[0].run_id}.progress")}
        if layout:
            cmd, env = multinode.launch_command(layout, ENTRY, config_path, [], out_dir,
                                                rows[0].run_id, env)
        else:
            visible = env.get("CUDA_VISIBLE_DEVICES") if first.device_type == "cuda" else None
            cmd = deepspeed_command(config_path, [], world, visible)
        cmd += ["--sweep", sweep]
        for _, p in batch:
            _clear_previous(out_dir, p.run_id, world)
    except OSError as e:  # after the checks, before any rank: the first row's record says why
        return [not_started(first.cfg, world, first.run_id, e)]
    watch = RankWatch(ENTRY, world)
    order = [r.run_id for r in rows]

    def next_row(run_id: str) -> None:
        watch.peak_rss_bytes.clear()
        before = batch[order.index(run_id) - 1]
        path = results.run_path(out_dir, before[1].run_id)
        record = results.read_record(path)
        if ended is not None and record is not None and record.get("status") == "ok":
            try:
                ended(*before, multinode.annotate(record, layout, path) if layout else record)
            except Exception as e:  # noqa: BLE001 - the output must keep flowing, or the ranks block
                print(f"gptbench: could not report {before[1].run_id} yet: {e}", file=sys.stderr)

    try:
        logs = RowLogs(rows, on_row=next_row)
    except OSError as e:  # the first row's log cannot be written
        return [not_started(first.cfg, world, first.run_id, e)]
    watch.sink = logs
    timeouts = {r.run_id: p.cfg.timeout_s for r, p in batch}
    proc, timed_out = None, None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        watch.follow(proc.stdout)
        with progress.watch(env[progress.ENV], rows[0].run_id, position=progress_position):
            while proc.poll() is None:
                if time.monotonic() - logs.started > timeouts[logs.current]:
                    timed_out = logs.current
                    break
                watch.poll(proc.pid)
                time.sleep(POLL_S)
            watch.poll(proc.pid)
        stop(proc)
        watch.close()
    except BaseException:
        if proc is not None:
            stop(proc)
            watch.close()
        for _, p in batch:
            drop_unfinished(results.run_path(out_dir, p.run_id))
        raise
    finally:
        if proc is not None:
            proc.stdout.close()
        logs.close()
    finished = []
    for row, p in batch:
        path = results.run_path(out_dir, p.run_id)
        record = results.read_record(path)
        if record is not None and record.get("status") == "ok" and timed_out != p.run_id:
            finished.append(multinode.annotate(record, layout, path) if layout else record)
            continue
        wall = time.monotonic() - logs.started if logs.current == p.run_id else 0.0
        record = finalize(p.cfg, p.run_id, world, proc.returncode, timed_out == p.run_id,
                          wall, watch if logs.current == p.run_id else None)
        peak = record.get("rank_peak_rss_bytes")
        if peak and row is not rows[0]:  # the watch forgot the earlier rows' peaks
            peak["source"] += ", since this row started (each rank resets VmHWM at a row's start)"
            results.write_json_atomic(path, record)
        finished.append(multinode.annotate(record, layout, path) if layout else record)
        break
    return finished


def not_started(cfg, world: int, run_id: str, error: OSError) -> dict:
    """The `failed` record of a run that could not start (a path, a permission); when even
    the record cannot be written, UserError: one line, exit 2."""
    line = (f"could not start: {error.strerror or error}"
            + (f": {error.filename}" if error.filename else ""))
    record = results.unfinished(cfg, world, run_id, "failed", line, None)
    try:
        results.write_json_atomic(results.run_path(cfg.output_dir, run_id), record)
    except OSError as e:
        raise UserError(f"output_dir: {line}; the record cannot be written either "
                        f"({e.strerror})") from None
    return record


def group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group `pgid`."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def stop(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """End the launcher's whole process group: SIGTERM, then SIGKILL after `grace_s`.

    Ranks can outlive the launcher (reparented), so the group is watched until it is
    empty, not only the launcher waited for. Ctrl-C and SIGTERM are ignored meanwhile: a
    second Ctrl-C must not leave ranks behind."""
    previous = _ignore_signals()
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None and not group_members(proc.pid):
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while ((proc.poll() is None or group_members(proc.pid))
                   and time.monotonic() < deadline):
                time.sleep(0.1)
        proc.wait()
    finally:
        _restore_signals(previous)


def _ignore_signals() -> dict:
    try:
        return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are not ours to handle there
        return {}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def drop_unfinished(path: str) -> None:
    """An interrupted run's record (a rank's `failed` written on the way down) is removed;
    a record that is already `ok` was finished and is kept."""
    record = results.read_record(path)
    if record is not None and record.get("status") != "ok":
        os.unlink(path)


def _clear_previous(output_dir: str, run_id: str, world: int) -> None:
    """A rerun of a run_id replaces its record; the old one is kept under runs/.previous."""
    path = results.run_path(output_dir, run_id)
    if os.path.exists(path):
        keep = os.path.join(output_dir, "runs", ".previous")
        os.makedirs(keep, exist_ok=True)
        os.replace(path, os.path.join(keep, f"{run_id}.{time.time_ns()}.json"))
    for rank in range(world):
        if os.path.exists(error_path(output_dir, run_id, rank)):
            os.unlink(error_path(output_dir, run_id, rank))


def _rank_errors(output_dir: str, run_id: str, world: int) -> dict[int, dict]:
    out = {}
    for rank in range(world):
        try:
            with open(error_path(output_dir, run_id, rank), encoding="utf-8") as f:
                out[rank] = json.load(f)
        except (OSError, ValueError):
            continue
    return out


def _clean(line: str) -> str:
    return SOURCE_LOCATION.sub("", line)


def _has_cause(errors: dict[int, dict]) -> bool:
    """Some rank reported its own failure, not only that it gave up waiting for a peer."""
    return any(not WAITING.search(e["error"]) for e in errors.values())


def blame(errors: dict[int, dict], world: int) -> tuple[int | None, str, str]:
    """(failing rank, status, one-line error) from what the ranks reported."""
    causes = {r: e for r, e in errors.items() if not WAITING.search(e["error"])}
    if causes:
        rank = min(causes)
        return rank, causes[rank]["status"], f"rank {rank}: {_clean(causes[rank]['error'])}"
    silent = [r for r in range(world) if r not in errors]
    if errors and silent:
        waiter = min(errors)
        return (silent[0], "failed",
                f"rank {silent[0]} stopped responding; rank {waiter} gave up waiting for it: "
                f"{_clean(errors[waiter]['error'])}")
    if errors:
        rank = min(errors)
        return rank, errors[rank]["status"], f"rank {rank}: {_clean(errors[rank]['error'])}"
    return None, "failed", "no rank reported an error"


def finalize(cfg, run_id: str, world: int, returncode: int | None, timed_out: bool,
             wall_s: float, watch: RankWatch | None = None) -> dict:
    path = results.run_path(cfg.output_dir, run_id)
    record = results.read_record(path)
    watch = watch or RankWatch(ENTRY, world)
    if record is not None and record.get("status") == "ok" and not timed_out:
        if watch.peak_rss_bytes and not record.get("rank_peak_rss_bytes"):
            record["rank_peak_rss_bytes"] = watch.peak_rss_record()
            results.write_json_atomic(path, record)
        return record
    errors = _rank_errors(cfg.output_dir, run_id, world)
    for rank, timeout in watch.timeouts.items():  # aborted by NCCL's watchdog: no error file
        errors.setdefault(rank, {"rank": rank, "status": "failed",
                                 "error": watchdog_error(timeout)})
    told = None if timed_out or _has_cause(errors) else watch.explain(returncode)
    if told is not None and errors and (told[0] is None or told[0] in errors):
        told = None  # the signal does not explain the silent rank the others waited for
    if timed_out:
        silent = [r for r in range(world) if r not in errors]
        status, rank = "timeout", None
        line = (f"the run exceeded timeout_s={cfg.timeout_s:g} s and was stopped "
                f"(no error from rank(s) {', '.join(map(str, silent)) or 'none'}; "
                f"see engine.comm_timeout_s)")
    elif told is not None:
        (rank, line), status = told, "failed"
    else:
        rank, status, line = blame(errors, world)
        if not errors:
            line = f"the launcher exited with code {returncode} and {line}"
    record = results.unfinished(cfg, world, run_id, status, line, rank,
                                record if record is not None and record.get("status") != "ok"
                                else None)
    record["wall_s"] = wall_s
    record["rank_peak_rss_bytes"] = watch.peak_rss_record()
    if any(e.get("cuda_memory") for e in errors.values()):
        record["memory_at_failure"] = {r: e["cuda_memory"] for r, e in errors.items()
                                       if e.get("cuda_memory")}
    results.write_json_atomic(path, record)
    return record
