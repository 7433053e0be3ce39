"""A suite file's precedence: base YAML < suite `set:` < row `set:` < `--set`; output_dir and
run_id come from where the user named them. Nothing here starts a rank."""
import json
import shutil

import pytest

from gptbench import cli
from gptbench.config import load_config
from gptbench.errors import UserError
from gptbench.suite import load_suite
from paths import TINY_CPU

SUITE = """\
title: precedence
output_dir: out
base: tiny.yaml
set: {workload.iterations: 3, workload.warmup: 0}
runs:
  - {id: a, ranks: 1, set: {strategy: pure_data_parallel}}
  - {id: b, ranks: 1, set: {strategy: pure_data_parallel, workload: {iterations: 2}}}
"""


@pytest.fixture
def suite_file(tmp_path):
    shutil.copy(TINY_CPU, tmp_path / "tiny.yaml")
    (tmp_path / "suite.yaml").write_text(SUITE, encoding="utf-8")
    return str(tmp_path / "suite.yaml")


def configs(suite):
    return {r.run_id: load_config(suite.base, list(r.overrides)) for r in suite.runs}


def test_row_set_wins_over_suite_set_over_base(suite_file):
    cfg = configs(load_suite(suite_file))
    assert cfg["a"].workload.iterations == 3 and cfg["b"].workload.iterations == 2
    assert cfg["a"].workload.warmup == 0  # the base (tiny-cpu.yaml) says 1
    assert cfg["a"].run_id == "a" and cfg["a"].output_dir.endswith("out")


def test_command_line_set_wins_and_says_what_it_replaced(suite_file):
    suite = load_suite(suite_file, overrides=["strategy=pp", "workload.iterations=1"])
    cfg = configs(suite)
    assert {c.strategy for c in cfg.values()} == {"pipeline_data_hybrid"}
    assert {c.workload.iterations for c in cfg.values()} == {1}
    replaced = {r.run_id: r.replaced for r in suite.runs}
    assert replaced["b"] == ("run 'b': --set strategy=pp replaces strategy=pure_data_parallel of the suite file",
                             "run 'b': --set workload.iterations=1 replaces workload.iterations=2 of the suite file")
    assert "run 'a': --set workload.iterations=1 replaces workload.iterations=3 of the suite file" in replaced["a"]


def test_set_output_dir_names_the_suite_folder(suite_file, tmp_path):
    suite = load_suite(suite_file, overrides=[f"output_dir={tmp_path / 'elsewhere'}"])
    assert suite.output_dir == str(tmp_path / "elsewhere")
    assert {c.output_dir for c in configs(suite).values()} == {str(tmp_path / "elsewhere")}
    same = load_suite(suite_file, output_dir="x", overrides=["output_dir=x"])
    assert same.output_dir == "x"


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ["run_id=z"]}, "--set run_id: a suite names each run by its row id"),
    ({"overrides": ["output_dir=x"], "output_dir": "y"}, "--set output_dir=x and --output-dir y name different"),
])
def test_what_a_suite_cannot_take_from_the_command_line(suite_file, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_suite(suite_file, **kwargs)


def test_a_suite_set_cannot_name_the_output_folder(suite_file):
    with open(suite_file, "a", encoding="utf-8") as f:
        f.write("  - {id: c, ranks: 1, set: {output_dir: other}}\n")
    with pytest.raises(UserError, match=r"runs\[2\]: 'output_dir' cannot be set per run"):
        load_suite(suite_file)


def test_only_takes_comma_separated_ids(suite_file):
    assert [r.run_id for r in load_suite(suite_file, only=["a,b"]).runs] == ["a", "b"]
    assert [r.run_id for r in load_suite(suite_file, only=["b", "a"]).runs] == ["a", "b"]
    with pytest.raises(UserError, match="--only: no run 'c'"):
        load_suite(suite_file, only=["a,c"])


def test_the_command_runs_the_row_as_the_command_line_says(suite_file, tmp_path, capsys, monkeypatch):
    """End to end, with a configuration that is recorded without starting ranks: the row
    says pure_data_parallel, --set says full_model_parallel (not applicable on 1 rank)."""
    monkeypatch.chdir(tmp_path)  # where the suite's own output_dir (out) would be
    out = tmp_path / "chosen"
    code = cli.main(["suite", suite_file, "--only", "b", "--set", "strategy=full", "--set", f"output_dir={out}"])
    assert code == 0
    said = capsys.readouterr().out
    assert "run 'b': --set strategy=full replaces strategy=pure_data_parallel of the suite file" in said
    record = json.loads((out / "runs" / "b.json").read_text())
    assert record["strategy"] == "full_model_parallel" and record["status"] == "not_applicable"
    assert not (tmp_path / "out").exists()
