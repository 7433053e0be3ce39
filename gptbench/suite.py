"""A suite: every configuration as its own launcher process, then the report.

Suite YAML:
    title: ...
    output_dir: reports/demo
    base: tiny-cpu.yaml        # benchmark config every run starts from (relative path)
    set: {workload.iterations: 3}   # overrides for every run
    hostfile: hosts.txt        # optional: every run on these hosts (relative path; one rank
                               # per slot, so a run's `ranks` is the slot total or omitted)
    runs:
      - {id: 1r-dp, ranks: 1, set: {strategy: pure_data_parallel}}

Precedence, lowest first: the base config, the suite's `set:`, the row's `set:`, then
`--set` on the command line, which wins and is announced where it replaces a row's value.
`output_dir` comes from `--output-dir` or `--set output_dir=` (else the suite's key) and
`run_id` from the row's id, so neither may appear in a `set:`.

Every configuration is validated before the first one starts. A failed, out-of-memory,
timed-out or not-applicable configuration is recorded and the suite goes on. Ctrl-C or
SIGTERM stops the run in flight (every rank of it; its partial record is removed), keeps
every finished record and exits 130 (143 for SIGTERM); `--resume` skips every configuration
that has a record (of any status) and runs the rest. Without `--resume` (and without
`--only`), earlier results in the output folder are moved aside to
`<output_dir>.prev-<time>`, never overwritten.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from gptbench import faults, launcher, limits, results
from gptbench.config import override_pairs, read_yaml, set_pair
from gptbench.errors import UserError

SUITE_KEYS = {"title", "output_dir", "base", "set", "runs", "description", "hostfile"}
RUN_KEYS = {"id", "ranks", "set"}


@dataclass(frozen=True)
class SuiteRun:
    run_id: str
    ranks: int
    overrides: tuple[str, ...]
    replaced: tuple[str, ...] = ()  # where the command line replaced the suite's value


@dataclass(frozen=True)
class Suite:
    title: str
    output_dir: str
    base: str
    runs: tuple[SuiteRun, ...]
    hostfile: str | None = None


def load_suite(path: str, output_dir: str | None = None, only: list[str] | None = None,
               overrides: list[str] = ()) -> Suite:
    data = read_yaml(path)
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown suite key '{unknown[0]}' (allowed: "
                        f"{', '.join(sorted(SUITE_KEYS))})")
    for key in ("base", "runs"):
        if key not in data:
            raise UserError(f"{path}: missing suite key '{key}'")
    if not isinstance(data["base"], str):
        raise UserError(f"{path}: base must be the path of a benchmark config, got "
                        f"{limits.show(data['base'])}")
    base = os.path.join(os.path.dirname(path), data["base"])
    if not os.path.isfile(base):
        raise UserError(f"{path}: base config not found: {base}")
    command_line, out = _command_line(overrides, output_dir)
    if not out and data.get("output_dir") is not None:
        out = limits.check_path(f"{path}: output_dir", data["output_dir"])
    out = out or f"reports/{os.path.splitext(os.path.basename(path))[0]}"
    limits.check_path("output_dir", out)
    common = _suite_pairs(data.get("set"), f"{path}: set")
    if not isinstance(data["runs"], list) or not data["runs"]:
        raise UserError(f"{path}: 'runs' must be a non-empty list")
    hostfile, slots = _hostfile(path, data.get("hostfile"))
    runs, seen = [], set()
    for i, item in enumerate(data["runs"]):
        where = f"{path}: runs[{i}]"
        if not isinstance(item, dict) or "id" not in item:
            raise UserError(f"{where}: each run needs an 'id'")
        bad = sorted(set(item) - RUN_KEYS)
        if bad:
            raise UserError(f"{where}: unknown key '{bad[0]}' (allowed: id, ranks, set)")
        run_id = item["id"]
        if limits.is_int(run_id) and run_id >= 0:
            run_id = str(run_id)  # `id: 1` names run "1"
        limits.check_run_id(f"{where}: id", run_id)
        if run_id in seen:
            raise UserError(f"{where}: duplicate id '{run_id}'")
        seen.add(run_id)
        ranks = item.get("ranks", slots or 1)
        if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
            raise UserError(f"{where}: ranks must be a positive integer, got {limits.show(ranks)}")
        if not slots:
            limits.check_local_ranks(f"{where}: ranks", ranks)
        if slots and ranks != slots:
            raise UserError(f"{where}: ranks={ranks}, but the suite's hostfile {hostfile} has "
                            f"{slots} slot(s): every run uses all of them")
        own = common + _suite_pairs(item.get("set"), where)
        names = [set_pair("output_dir", out), set_pair("run_id", run_id)]  # quoted if need be
        runs.append(SuiteRun(run_id, ranks, tuple(own + command_line + names),
                             _replaced(own, command_line, run_id)))
    if only is not None:
        only = [o.strip() for item in only for o in item.split(",") if o.strip()]
        if not only:
            raise UserError(f"--only: no run id given (runs: {', '.join(sorted(seen))})")
        missing = sorted(set(only) - seen)
        if missing:
            raise UserError(f"--only: no run '{missing[0]}' in {path} (runs: {', '.join(sorted(seen))})")
        runs = [r for r in runs if r.run_id in only]
    title = data.get("title")
    if title is not None and not isinstance(title, (str, int, float)):
        raise UserError(f"{path}: title must be text, got {limits.show(title)}")
    return Suite(str(title or os.path.basename(path)), out, base, tuple(runs),
                 hostfile)


def _hostfile(path: str, value) -> tuple[str | None, int | None]:
    """(the suite's hostfile, relative to the suite file, and its slot total) or Nones."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise UserError(f"{path}: hostfile must be the path of a DeepSpeed hostfile, got "
                        f"{limits.show(value)}")
    from gptbench.hostfile import read_hostfile

    hostfile = os.path.join(os.path.dirname(path), value)
    return hostfile, sum(slots for _, slots in read_hostfile(hostfile))


def _key(pair: str) -> str:
    return pair.partition("=")[0].strip()


def _suite_pairs(mapping, where: str) -> list[str]:
    """A suite's or row's `set:` as KEY=VALUE pairs; output_dir and run_id are not its to set."""
    pairs = override_pairs(mapping, where)
    for pair in pairs:
        if _key(pair) in ("output_dir", "run_id"):
            raise UserError(f"{where}: '{_key(pair)}' cannot be set per run (the suite's output_dir "
                            "key or --output-dir names the folder; a row's id names its run)")
    return pairs


def _command_line(overrides, output_dir: str | None) -> tuple[list[str], str | None]:
    """(--set pairs for every run, the output folder they or --output-dir name, or None)."""
    pairs, out = [], output_dir
    for pair in overrides:
        key, _, value = pair.partition("=")
        key = key.strip()
        if key == "run_id":
            raise UserError("--set run_id: a suite names each run by its row id; use --only ID "
                            "to run one row")
        if key == "output_dir":
            value = value.strip()
            if output_dir and os.path.normpath(value) != os.path.normpath(output_dir):
                raise UserError(f"--set output_dir={value} and --output-dir {output_dir} name "
                                "different folders; give one")
            out = value
        else:
            pairs.append(pair)
    return pairs, out


def _replaced(own: list[str], command_line: list[str], run_id: str) -> tuple[str, ...]:
    """What the command line replaces of a run's own settings, one line each."""
    theirs = {_key(p): p for p in own}  # a row's pair comes after the suite's: the row's wins
    return tuple(f"run '{run_id}': --set {p} replaces {theirs[_key(p)]} of the suite file"
                 for p in command_line if _key(p) in theirs and theirs[_key(p)] != p.strip())


def check(suite: Suite, path: str) -> None:
    """Every configuration (and GPTBENCH_FAULT) checked before anything starts."""
    spec = os.environ.get(faults.ENV) or None
    fault = faults.parse(spec)
    most = max(r.ranks for r in suite.runs)
    if fault is not None and fault.rank >= most:
        raise UserError(f"{faults.ENV}: rank={fault.rank}, but no run of {path} has more than "
                        f"{most} rank(s)")
    for r in suite.runs:
        try:
            launcher.prepare(suite.base, list(r.overrides), r.ranks, on_hosts=bool(suite.hostfile))
        except UserError as e:
            raise UserError(f"{path}: run '{r.run_id}': {e}") from None
    if suite.hostfile:  # every host answers by ssh before the first run starts
        from gptbench.hostfile import load_layout
        from gptbench.multinode import preflight

        preflight(load_layout(suite.hostfile), dict(os.environ))


def _set_aside(output_dir: str) -> str | None:
    """Earlier results move to `<output_dir>.prev-<time>[-n]`, never overwritten."""
    runs = os.path.join(output_dir, "runs")
    if not (os.path.isdir(runs) and any(n.endswith(".json") for n in os.listdir(runs))):
        return None
    stem = f"{os.path.normpath(output_dir)}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = stem, 1
    while os.path.exists(aside):
        n += 1
        aside = f"{stem}-{n}"
    os.rename(output_dir, aside)
    return aside


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def run_suite(path: str, resume: bool = False, output_dir: str | None = None,
              only: list[str] | None = None, overrides: list[str] = ()) -> int:
    from tqdm import tqdm

    suite = load_suite(path, output_dir, only, overrides)
    check(suite, path)
    for note in (n for r in suite.runs for n in r.replaced):
        print(f"gptbench: {note}")
    if not resume and not only:
        aside = _set_aside(suite.output_dir)
        if aside:
            print(f"gptbench: earlier results in {suite.output_dir} moved to {aside}")
    os.makedirs(os.path.join(suite.output_dir, "logs"), exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    done = 0
    bar = tqdm(suite.runs, desc=suite.title, unit="run", dynamic_ncols=True)
    current = None
    try:
        for r in bar:
            path_r = results.run_path(suite.output_dir, r.run_id)
            earlier = results.read_record(path_r) if resume else None
            if earlier is not None:
                redo = ("" if earlier["status"] in ("ok", "not_applicable")
                        else f"; delete {path_r} to run it again")
                bar.write(f"{r.run_id}: already recorded ({earlier['status']}), skipped{redo}")
                continue
            current = path_r
            bar.set_postfix_str(f"{r.run_id} running")
            record = launcher.run(suite.base, list(r.overrides), ranks=r.ranks,
                                  log_path=os.path.join(suite.output_dir, "logs", f"{r.run_id}.log"),
                                  check_fault_rank=False, progress_position=1,
                                  hostfile=suite.hostfile)
            current = None
            done += 1
            bar.write(_line(record))
    except (KeyboardInterrupt, _Terminated) as e:
        bar.close()
        if current:
            launcher.drop_unfinished(current)  # the interrupted run is rerun by --resume
        again = " ".join([f"gptbench suite {path} --resume"]
                         + ([f"--output-dir {output_dir}"] if output_dir else [])
                         + [f"--only {o}" for o in only or []] + [f"--set {o}" for o in overrides])
        print(f"gptbench: interrupted; finished records kept in {suite.output_dir}/runs; "
              f"continue with: {again}", file=sys.stderr, flush=True)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    from gptbench.report.render import render_report

    written, skipped = render_report(suite.output_dir, title=suite.title)
    for skipped_path, reason in skipped:
        print(f"gptbench: skipped {skipped_path}: {reason}", file=sys.stderr)
    print(f"gptbench: {done} run(s) this time; report: {written.get('report.html', suite.output_dir)}")
    return 0


def emulate_suite(path: str, output_dir: str | None = None, only: list[str] | None = None,
                  overrides: list[str] = (), comm_file: str | None = None,
                  interconnect: str | None = None) -> int:
    """`suite FILE --emulate`: every row emulated (gptbench/emulate.py) in one child process
    (one role cache for all rows; a failed row is recorded and the rest still run), records
    `emu-<id>` beside the suite's own (nothing is moved aside), then the report."""
    import subprocess

    from gptbench import emulate, predict

    suite = load_suite(path, output_dir, only, overrides)
    emulate.check_rows(suite, path)
    predict.latency_from(comm_file, interconnect)  # bad input before the child starts
    cmd = [sys.executable, "-m", "gptbench.emulate", "--suite", path,
           "--output-dir", suite.output_dir]
    cmd += [f"--only={o}" for o in only or []] + [f"--set={o}" for o in overrides]
    cmd += [f"--comm-file={comm_file}"] if comm_file else []
    cmd += [f"--interconnect={interconnect}"] if interconnect else []
    code = subprocess.run(cmd).returncode
    if code == 2:
        return 2
    from gptbench.report.render import render_report

    written, skipped = render_report(suite.output_dir, title=suite.title)
    for skipped_path, reason in skipped:
        print(f"gptbench: skipped {skipped_path}: {reason}", file=sys.stderr)
    print(f"gptbench: emulated rows in {suite.output_dir}/runs (emu-*); report: "
          f"{written.get('report.html', suite.output_dir)}")
    return 0 if code == 0 else 1


def _line(record: dict) -> str:
    if record["status"] == "ok":
        m, p = record["metrics"], record.get("parity") or {}
        return (f"{record['run_id']}: ok, {m['throughput_tokens_per_s']:.1f} tokens/s, "
                f"parity {'passed' if p.get('passed') else 'NOT passed'}")
    return f"{record['run_id']}: {record['status']}: {record.get('error')}"

