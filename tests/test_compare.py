"""compare: deltas by run_id, direction-aware regression gate, environment diff."""

import json
import shutil
from pathlib import Path

import pytest

from gptbench.compare import compare, parse_fail_on
from gptbench.errors import UserError

FIXTURE_SUITE = Path(__file__).parent / "fixtures" / "suite"
THROUGHPUT_GATE = [("throughput_tokens_per_s", 5.0)]


@pytest.fixture
def suites(tmp_path):
    """(base, candidate): two identical copies of the fixture suite."""
    return shutil.copytree(FIXTURE_SUITE, tmp_path / "base"), shutil.copytree(FIXTURE_SUITE, tmp_path / "candidate")


def edit_run(suite_dir: Path, run_id: str, edit) -> Path:
    path = suite_dir / "runs" / f"{run_id}.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return path


def scale_throughput(factor: float):
    def edit(record):
        record["metrics"]["throughput_tokens_per_s"] *= factor
    return edit


def test_no_change_passes_the_gate(suites):
    text, exit_code = compare(*suites, THROUGHPUT_GATE)
    assert exit_code == 0
    assert "Result: no regression" in text
    assert "Environment: identical" in text


def test_a_20_percent_throughput_regression_fails_a_5_percent_gate(suites):
    base, candidate = suites
    edit_run(candidate, "4gpu-tp2-dp2", scale_throughput(0.8))
    text, exit_code = compare(base, candidate, [parse_fail_on("throughput_tokens_per_s:5")])
    assert exit_code == 1
    assert "4gpu-tp2-dp2 throughput_tokens_per_s: 20.0% worse, limit 5%" in text
    assert "-20.0%" in text


def test_a_regression_within_the_limit_passes(suites):
    base, candidate = suites
    edit_run(candidate, "4gpu-tp2-dp2", scale_throughput(0.8))
    assert compare(base, candidate, [("throughput_tokens_per_s", 25.0)])[1] == 0


def test_the_gate_knows_which_direction_is_better(suites):
    base, candidate = suites
    edit_run(candidate, "4gpu-dp4", scale_throughput(1.2))  # faster: not a regression
    assert compare(base, candidate, THROUGHPUT_GATE)[1] == 0

    def slower_first_token(record):
        record["metrics"]["ttft_ms"]["p50"] *= 1.2
    edit_run(candidate, "2gpu-tp2", slower_first_token)  # latency up: a regression, judged on p50
    text, exit_code = compare(base, candidate, [("ttft_ms", 5.0)])
    assert exit_code == 1
    assert "2gpu-tp2 ttft_ms.p50: 20.0% worse" in text
    assert compare(candidate, base, [("ttft_ms", 5.0)])[1] == 0  # the other way round it improved


def test_a_run_that_stopped_finishing_fails_the_gate(suites):
    base, candidate = suites

    def crash(record):
        record.update(status="failed", error="RuntimeError: planted crash")
        record["metrics"]["throughput_tokens_per_s"] = None
    edit_run(candidate, "2gpu-dp2", crash)
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE)
    assert exit_code == 1
    assert "status: ok -> failed (RuntimeError: planted crash)" in text
    assert "2gpu-dp2 throughput_tokens_per_s: missing in candidate" in text


def test_environment_differences_are_listed(suites):
    base, candidate = suites
    for path in (candidate / "runs").glob("*pu-*.json"):
        edit_run(candidate, path.stem, lambda r: r["env"].update(torch="2.14.0", device_name="NVIDIA H200"))
    text, _ = compare(base, candidate, [])
    assert "torch: 2.13.0+cu128 -> 2.14.0" in text
    assert "device_name: NVIDIA H100 80GB HBM3 (fixture) -> NVIDIA H200" in text
    assert "python:" not in text


def test_single_run_records_compare_and_unmatched_runs_are_named(suites):
    base, candidate = suites
    (candidate / "runs" / "1gpu-dp1.json").unlink()
    text, exit_code = compare(base / "runs" / "4gpu-dp4.json", candidate / "runs" / "4gpu-dp4.json", THROUGHPUT_GATE)
    assert exit_code == 0 and "4gpu-dp4 (pure_data_parallel, world_size 4)" in text
    assert "Only in base: 1gpu-dp1" in compare(base, candidate, [])[0]


def test_unknown_metric_is_a_user_error_listing_the_valid_ones(suites):
    with pytest.raises(UserError) as error:
        compare(*suites, [("tokens_per_second", 5.0)])
    assert "tokens_per_second" in str(error.value)
    assert "throughput_tokens_per_s" in str(error.value) and "ttft_ms" in str(error.value)


def test_a_metric_without_a_better_direction_cannot_gate(suites):
    with pytest.raises(UserError, match="throughput_iterations"):
        compare(*suites, [("throughput_iterations", 5.0)])


def test_no_common_run_id_is_a_user_error(suites):
    base, candidate = suites
    with pytest.raises(UserError, match="no run_id in common"):
        compare(base / "runs" / "1gpu-dp1.json", candidate / "runs" / "4gpu-dp4.json", [])


@pytest.mark.parametrize("spec, expected", [
    ("throughput_tokens_per_s:5", ("throughput_tokens_per_s", 5.0)),
    ("ttft_ms:2.5%", ("ttft_ms", 2.5)),
    ("comm_fraction:0", ("comm_fraction", 0.0)),
])
def test_parse_fail_on(spec, expected):
    assert parse_fail_on(spec) == expected


@pytest.mark.parametrize("spec", ["throughput_tokens_per_s", "throughput_tokens_per_s:", ":5",
                                  "throughput_tokens_per_s:five", "throughput_tokens_per_s:-5",
                                  "throughput_tokens_per_s:nan"])
def test_parse_fail_on_rejects_bad_syntax(spec):
    with pytest.raises(UserError, match="METRIC:PCT"):
        parse_fail_on(spec)
