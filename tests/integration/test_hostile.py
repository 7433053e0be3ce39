"""Hostile input, generated: configs, `--set` values, suite rows, hostfiles and run records
drawn from the schema, with the values a careless user (or a broken writer) hands over.

The contract checked for each one: refused with a `UserError` whose message is one line
(the CLI prints it and exits 2), or accepted as something valid; never another exception
(a traceback), and no file written, changed or lost. Checks run in-process, before any
rank would start; the examples are few and unhurried (a loaded 2-core machine) so `make
test` stays bounded. The explicit examples of issue 24 are in test_bad_input.py; the
record examples, which need a rendered report, are here.
"""
import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gptbench import cli, config, hostfile, launcher, limits, results, suite
from gptbench.compare import compare
from gptbench.errors import UserError
from gptbench.report.load import load_runs
from paths import FIXTURES, TINY_CPU

TINY = yaml.safe_load(Path(TINY_CPU).read_text())
TINY["output_dir"] = "out"
FIXTURE_SUITE = Path(FIXTURES) / "suite"
KEYS = sorted(config.flat(config.RunConfig()))
# No example database: the tests change directory, and a clean clone stays clean.
FEW = settings(max_examples=25, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---- what a careless user types --------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 64), st.integers(-(10 ** 30), 10 ** 30),
    st.sampled_from([0, -1, 2 ** 63, 2 ** 64, 10 ** 23, 10 ** 400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 0.5, 1e-300]))
STRINGS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "a/b", ".x", "r" * 300, "\x00", "\u00b2", "\u0663", "@x",
                     "[unclosed", "{1: 2}", "..", "/proc/x", "tiny", "dp", "tp", "pp", "full",
                     "random", "float32", "cpu", "uniform", "in_flight", "off", "auto"]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 3)), inner, max_size=3)),
    max_leaves=5)
RAW = st.one_of(st.text(max_size=24), st.sampled_from([
    "[unclosed", "@x", "{1: 2}", "{[1]: 2}", ".nan", ".inf", "-.inf", "1.0e+300", "7" * 4400,
    "&a [*a]", "!!python/object:os.system ls", "%TAG", "`x`", "'", "\"", "- a\n- b", "a: b: c",
    "[" * 500, "0x10", "0o7", "1_000", "~", "yes", "off", "2", "4", "tiny"]))


TINY_VALUES = config.flat(config.config_from_dict(TINY))


def good(key: str):
    """Values `key` can take in the tiny config: so that some drawn configs are accepted."""
    options = [TINY_VALUES[key], *config.CHOICES.get(key, ())]
    if key in config.INT_BOUNDS or key in config.POSITIVE:
        options += [1, 2, 4]
    return st.sampled_from([o for o in options if o is not None] or [None])


EDIT = st.sampled_from(KEYS).flatmap(
    lambda key: st.tuples(st.just(key), st.one_of(good(key), good(key), VALUES)))


def one_line_or_ok(call):
    """call()'s value, or None when it raised a one-line UserError; anything else raises."""
    try:
        value = call()
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        event("refused")
        return None
    event("accepted")
    return value


def files(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def workdir():
    """A fresh folder, made the working directory, holding tiny.yaml (output_dir: out)."""
    with tempfile.TemporaryDirectory() as d:
        before = os.getcwd()
        os.chdir(d)
        try:
            Path("tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
            yield Path(d)
        finally:
            os.chdir(before)


def set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[leaf] = value


@pytest.fixture(autouse=True)
def no_fault(monkeypatch):
    monkeypatch.delenv("GPTBENCH_FAULT", raising=False)


def _accepted_config_is_valid(prepared) -> None:
    if prepared is not None:  # accepted: a config the run would start with
        cfg = prepared.cfg
        assert 1 <= prepared.world <= limits.RANKS_PER_CORE * limits.cores()
        limits.check_run_id("run_id", prepared.run_id)
        for key, value in config.flat(cfg).items():
            if isinstance(value, float):
                assert math.isfinite(value), key


# ---- configs, --set values, suite rows, hostfiles ----------------------------------------------

@FEW
@given(edits=st.lists(st.one_of(EDIT, EDIT, EDIT, st.tuples(
           st.sampled_from(["colour", "workload.bogus", "model"]), VALUES)), max_size=3),
       ranks=st.one_of(st.none(), st.integers(-2, 6), st.sampled_from([10 ** 20, 100000])))
def test_a_generated_config_is_refused_in_one_line_or_prepared(edits, ranks):
    with workdir() as d:
        tree = copy.deepcopy(TINY)
        for key, value in edits:
            set_dotted(tree, key, value)
        Path("c.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
        before = files(d)
        _accepted_config_is_valid(one_line_or_ok(lambda: launcher.prepare("c.yaml", [], ranks)))
        assert files(d) == before


@FEW
@given(pair=st.one_of(
    EDIT.map(lambda kv: (kv[0], config._yaml_scalar(kv[1]))),
    st.tuples(st.sampled_from(KEYS + ["", "a..b", "workload", "model.seed.x", "." * 40]), RAW)))
def test_a_generated_set_value_is_refused_in_one_line_or_prepared(pair):
    key, raw = pair
    with workdir() as d:
        before = files(d)
        prepared = one_line_or_ok(lambda: launcher.prepare("tiny.yaml", [f"{key}={raw}"]))
        _accepted_config_is_valid(prepared)
        assert files(d) == before


NAMES = st.sampled_from(["a", "b", "c", "1r-dp", "2r-tp"])
ROW = st.fixed_dictionaries({
    "id": st.one_of(NAMES, NAMES, NAMES, STRINGS, st.integers(-3, 10 ** 20), st.none(),
                    st.booleans(), st.lists(st.integers(), max_size=2))}, optional={
    "ranks": st.one_of(st.integers(1, 4), st.integers(1, 4), st.integers(-3, 4),
                       st.sampled_from([10 ** 20, 100000]), STRINGS, st.none(), st.floats()),
    "set": st.one_of(st.none(), st.lists(EDIT, max_size=2).map(
        lambda kvs: {k: v for k, v in kvs if k not in ("run_id", "output_dir")}), VALUES)})
ROWS = st.lists(st.one_of(ROW, ROW, ROW, st.just({"id": "x", "colour": "red"})), max_size=3)


@FEW
@given(rows=ROWS, common=st.one_of(st.none(), st.none(), VALUES),
       only=st.one_of(st.none(), st.none(), st.lists(st.one_of(NAMES, STRINGS), max_size=2)))
def test_generated_suite_rows_are_refused_in_one_line_or_checked(rows, common, only):
    with workdir() as d:
        text = yaml.safe_dump({"title": "t", "base": "tiny.yaml", "output_dir": "out",
                               "set": common, "runs": rows})
        Path("s.yaml").write_text(text, encoding="utf-8")
        before = files(d)

        def load_and_check():
            s = suite.load_suite("s.yaml", only=only)
            suite.check(s, "s.yaml")
            return s

        checked = one_line_or_ok(load_and_check)
        if checked is not None:
            assert checked.runs and len({r.run_id for r in checked.runs}) == len(checked.runs)
            for r in checked.runs:
                limits.check_run_id("id", r.run_id)
        assert files(d) == before and not (d / "out").exists()


GOOD_HOST = st.builds(lambda host, n: f"{host} slots={n}",
                      st.sampled_from(["localhost", "127.0.0.1", "127.0.0.2", "h1", "h2"]),
                      st.integers(1, 8))
HOST_LINE = st.one_of(
    GOOD_HOST, GOOD_HOST, GOOD_HOST, st.text(max_size=30), st.just("# a comment"), st.just(""),
    st.builds(lambda host, n: f"{host} slots={n}",
              st.sampled_from(["localhost", "127.0.0.1", "::1", "h1", "a" * 300, "x\x7f"]),
              st.one_of(st.integers(-2, 10 ** 25).map(str),
                        st.sampled_from(["\u00b2", "\u0663", "", "1e3", "0x10", "\u4e03",
                                         "9" * 5000]))))


@FEW
@given(lines=st.lists(HOST_LINE, max_size=4),
       junk=st.one_of(st.none(), st.none(), st.binary(max_size=6)),
       ranks=st.one_of(st.none(), st.none(), st.integers(0, 8), st.just(10 ** 20)))
def test_a_generated_hostfile_is_refused_in_one_line_or_read(lines, junk, ranks):
    with workdir() as d:
        Path("hosts").write_bytes("\n".join(lines).encode("utf-8") + (junk or b""))
        before = files(d)
        layout = one_line_or_ok(lambda: hostfile.load_layout("hosts", ranks))
        if layout is not None:
            names = layout.names
            assert names and len(set(names)) == len(names)
            assert all(1 <= slots <= limits.MAX_SLOTS_PER_HOST for _, slots in layout.hosts)
            assert ranks is None or ranks == layout.world_size
        assert files(d) == before


# ---- records a reader cannot believe -----------------------------------------------------------

RECORD_PATHS = sorted({p.replace(".*", ".p50") for p in results.FIELD_TYPES}
                      | {"status", "run_id", "schema", "metrics", "topology"})


def copy_suite(destination: Path) -> Path:
    shutil.copytree(FIXTURE_SUITE, destination)
    return destination


def edit_record(path: Path, edits: dict) -> None:
    record = json.loads(path.read_text())
    for dotted, value in edits.items():
        set_dotted(record, dotted, value)
    path.write_text(json.dumps(record))  # NaN and Infinity as Python's json writes them


def _believable(record: dict) -> None:
    """Every figure the readers use is finite, >= 0 and within MAX_FIGURE."""
    for path, kind in results.FIELD_TYPES.items():
        if kind in (results.NUMBER, int) and not path.endswith(".*"):
            value = results.value_at(record, path)
            if value is not None and not isinstance(value, bool):
                assert 0 <= value <= results.MAX_FIGURE, (path, value)


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.dictionaries(st.sampled_from(RECORD_PATHS), VALUES, min_size=1, max_size=2),
       run_id=st.sampled_from(["1gpu-dp1", "2gpu-dp2", "4gpu-tp2-pp2"]))
def test_a_generated_record_is_skipped_and_named_or_read(edits, run_id):
    with tempfile.TemporaryDirectory() as d:
        folder = copy_suite(Path(d) / "suite")
        edited = folder / "runs" / f"{run_id}.json"
        edit_record(edited, edits)
        runs_before = files(folder / "runs")
        records, skipped = load_runs(folder)
        named = {path.name for path, _ in skipped}
        kept = [r for r in records if r["run_id"] == run_id]
        assert "run_id" in edits or bool(kept) != (edited.name in named)
        for record in records:
            _believable(record)
        for _, reason in skipped:
            assert reason and "\n" not in reason
        one_line_or_ok(lambda: compare(folder, FIXTURE_SUITE, [("throughput_tokens_per_s", 5)],
                                       allow_missing=True))
        assert cli.main(["report", str(folder)]) == 0
        assert files(folder / "runs") == runs_before, "the reader changed a record"


@pytest.mark.parametrize("edit, reason", [
    ({"metrics.throughput_tokens_per_s": -500.0}, "is -500, not a figure a run can measure"),
    ({"metrics.throughput_tokens_per_s": 10 ** 400}, "expected a number or null"),
    ({"metrics.throughput_tokens_per_s": math.nan}, "expected a number or null"),
    ({"metrics.throughput_tokens_per_s": 1e300}, "not a figure a run can measure"),
    ({"metrics.gpu_utilization_pct": {"mean": 250.0, "per_rank": [250.0]}}, "is 250, not a figure"),
    ({"metrics.comm_fraction": 1.5}, "metrics.comm_fraction is 1.5"),
    ({"metrics.ttft_ms.p99": -1}, "metrics.ttft_ms.p99 is -1"),
    ({"metrics.peak_memory_bytes.per_rank": [1, -5]}, "is -5"),
])
def test_a_record_that_cannot_be_true_is_skipped_named_and_not_rendered(tmp_path, capsys, edit,
                                                                        reason):
    """Issue 24: -500 tok/s rendered as fact ("-0.24x"); a 400-digit throughput crashed
    report and compare with OverflowError."""
    folder = copy_suite(tmp_path / "suite")
    edit_record(folder / "runs" / "2gpu-dp2.json", edit)
    assert cli.main(["report", str(folder)]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "2gpu-dp2.json" in x)
    assert reason in line, err
    md = (folder / "report.md").read_text()
    shown = [x for x in md.splitlines() if "2gpu-dp2" in x]
    assert shown and all("runs/2gpu-dp2.json" in x for x in shown), shown  # named, not a row
    assert "−0." not in md
    text, code = compare(folder, FIXTURE_SUITE, [("throughput_tokens_per_s", 5)],
                         allow_missing=True)
    assert f"Skipped {folder / 'runs' / '2gpu-dp2.json'}: " in text
    assert code == 0


def test_a_4301_digit_number_in_a_record_is_invalid_json_not_a_crash(tmp_path):
    folder = copy_suite(tmp_path / "suite")
    path = folder / "runs" / "2gpu-dp2.json"
    path.write_text(path.read_text().replace('"throughput_tokens_per_s": ', '"x": ' + "9" * 4400
                                             + ', "throughput_tokens_per_s": ', 1))
    records, skipped = load_runs(folder)
    assert ("2gpu-dp2.json", True) in [(p.name, r.startswith("not valid JSON")) for p, r in skipped]


# ---- a run that cannot start still leaves a record -----------------------------------------

def test_a_run_that_fails_before_its_ranks_start_leaves_a_failed_record(tmp_path, monkeypatch):
    """After the checks, before any rank: the log cannot be opened (its folder is gone). The
    record says so in one line; an earlier record of the run is kept under .previous."""
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    earlier = {"schema": results.SCHEMA, "run_id": "r1", "status": "failed", "error": "old"}
    results.write_json_atomic("out/runs/r1.json", earlier)
    record = launcher.run("tiny.yaml", ["run_id=r1"], ranks=1,
                          log_path=str(tmp_path / "gone" / "r1.log"))
    assert record["status"] == "failed"
    assert record["error"].startswith("could not start: No such file or directory: ")
    assert "\n" not in record["error"]
    assert results.read_run("out/runs/r1.json")["error"] == record["error"]
    kept = list(Path("out/runs/.previous").glob("r1.*.json"))
    assert [json.loads(p.read_text()) for p in kept] == [earlier]


def test_the_failed_record_of_a_run_that_could_not_start_reads_back(tmp_path):
    cfg = config.config_from_dict({**TINY, "output_dir": str(tmp_path / "out")})
    record = launcher.not_started(cfg, 1, "r2", PermissionError(13, "Permission denied", "/x"))
    assert record["error"] == "could not start: Permission denied: /x"
    assert results.read_run(tmp_path / "out" / "runs" / "r2.json")["status"] == "failed"


def test_a_suite_row_id_yaml_reads_as_a_number_or_null_stays_its_name(tmp_path, monkeypatch):
    """`id: 1` and `id: 'null'` name their runs: the launcher and the ranks read the same
    run_id back from the overrides (quoted where YAML would read a number or null)."""
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    rows = [{"id": 1}, {"id": "null"}, {"id": "0x1F"}, {"id": "yes"}]
    Path("s.yaml").write_text(yaml.safe_dump({"base": "tiny.yaml", "runs": rows,
                                              "output_dir": "null"}))
    s = suite.load_suite("s.yaml")
    suite.check(s, "s.yaml")
    for r, name in zip(s.runs, ["1", "null", "0x1F", "yes"]):
        assert r.run_id == name
        cfg = config.load_config("tiny.yaml", list(r.overrides))
        assert (cfg.run_id, cfg.output_dir) == (name, "null")
        overrides = list(r.overrides) + [config.set_pair("run_id", name)]  # as the launcher adds it
        assert config.load_config("tiny.yaml", overrides).run_id == name


# ---- command-line numbers ------------------------------------------------------------------

FLAG_NUMBER = st.one_of(st.integers(-2, 64).map(str), NUMBERS.map(str), STRINGS,
                        st.sampled_from(["inf", "nan", "-0", "1e400", "99999999999999999999"]))


def cli_outcome(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command run in-process; argparse's own refusals
    (SystemExit 2, its usage) count as exit 2."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    event(f"exit {code}")
    return code, out, err


@FEW
@given(flags=st.lists(st.tuples(st.sampled_from(
    ["--gpus", "--batch-size", "--input-len", "--output-len", "--micro-batches",
     "--gpu-memory-gib", "--gpu-bandwidth-gbps", "--comm-latency-us"]), FLAG_NUMBER), max_size=3))
def test_generated_plan_flags_are_refused_in_one_line_or_planned(flags, capsys):
    argv = ["plan", "--model", "tiny"] + [f"{flag}={value}" for flag, value in flags]
    code, out, err = cli_outcome(argv, capsys)
    if code == 2 and err.startswith("gptbench: error: "):
        assert len(err.splitlines()) == 1 and out == "", err
    elif code == 0:
        assert "nan" not in out.lower().split() and "inf" not in out.lower().split()
    else:
        assert code == 2 and "usage:" in err, (code, err)  # argparse: not a number at all


@FEW
@given(spec=st.one_of(
    st.text(max_size=20),
    st.builds(lambda name, pct: f"{name}:{pct}",
              st.sampled_from(["throughput_tokens_per_s", "ttft_ms.p99", "latency_s", "x_ms",
                               "speedup", "peak_memory_bytes", "compile_s", "", "energy.joules"]),
              FLAG_NUMBER)))
def test_a_generated_fail_on_gate_is_refused_up_front_or_compares(spec, capsys):
    code, out, err = cli_outcome(["compare", str(FIXTURE_SUITE), str(FIXTURE_SUITE),
                                  f"--fail-on={spec}"], capsys)
    if err.startswith("gptbench: error: "):
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    else:
        assert code in (0, 1, 2) and out.splitlines()[-1].startswith(("Result:", "  ")), out
