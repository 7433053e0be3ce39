"""compare: deltas by run_id, direction-aware regression gate, environment diff."""

import re
import shutil
from pathlib import Path

import pytest

from gptbench.compare import compare, parse_fail_on
from gptbench.errors import UserError
from paths import FIXTURES
from records import edit_run

FIXTURE_SUITE = Path(FIXTURES) / "suite"
THROUGHPUT_GATE = [("throughput_tokens_per_s", 5.0)]


@pytest.fixture
def suites(tmp_path):
    """(base, candidate): two identical copies of the fixture suite."""
    return shutil.copytree(FIXTURE_SUITE, tmp_path / "base"), shutil.copytree(FIXTURE_SUITE, tmp_path / "candidate")




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
    text, exit_code = compare(base, candidate, parse_fail_on("throughput_tokens_per_s:5"))
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


def test_nothing_in_common_is_a_user_error(suites):
    base, candidate = suites
    for path in (base / "runs").glob("*.json"):
        if path.stem != "1gpu-dp1":
            path.unlink()
    for path in (candidate / "runs").glob("*.json"):
        if path.stem != "4gpu-dp4":
            path.unlink()
    with pytest.raises(UserError, match="nothing to compare: no run in common by run_id or by configuration"):
        compare(base, candidate, [])


def test_two_single_records_are_compared_whatever_they_hold(suites):
    base, candidate = suites
    text, exit_code = compare(base / "runs" / "1gpu-dp1.json", candidate / "runs" / "4gpu-dp4.json", [])
    assert exit_code == 0
    assert "Two single records compared although their configurations differ: 1gpu-dp1 (base), 4gpu-dp4" in text


@pytest.mark.parametrize("spec, expected", [
    ("throughput_tokens_per_s:5", [("throughput_tokens_per_s", 5.0)]),
    ("ttft_ms:2.5%", [("ttft_ms", 2.5)]),
    ("comm_fraction:0", [("comm_fraction", 0.0)]),
    ("ttft_ms.p99:5,throughput_tokens_per_s:2", [("ttft_ms.p99", 5.0), ("throughput_tokens_per_s", 2.0)]),
])
def test_parse_fail_on(spec, expected):
    assert parse_fail_on(spec) == expected


@pytest.mark.parametrize("spec", ["throughput_tokens_per_s", "throughput_tokens_per_s:", ":5",
                                  "throughput_tokens_per_s:five", "throughput_tokens_per_s:-5",
                                  "throughput_tokens_per_s:nan", "ttft_ms.p99:5,"])
def test_parse_fail_on_rejects_bad_syntax(spec):
    with pytest.raises(UserError, match="METRIC:PCT"):
        parse_fail_on(spec)


# ---- gates that keep their word -------------------------------------------------------------

def test_gate_names_are_the_names_compare_prints(suites):
    base, candidate = suites

    def slower_tail(record):
        record["metrics"]["ttft_ms"]["p99"] *= 1.2
    edit_run(candidate, "2gpu-tp2", slower_tail)
    text, exit_code = compare(base, candidate, parse_fail_on("ttft_ms.p99:5"))
    assert exit_code == 1
    assert "2gpu-tp2 ttft_ms.p99: 20.0% worse, limit 5%" in text
    assert re.search(r"^  ttft_ms\.p99 +34\.72 +41\.66 +\+20\.0%  REGRESSION", text, re.MULTILINE)  # as printed
    assert compare(base, candidate, parse_fail_on("ttft_ms:5"))[1] == 0  # ttft_ms alone is ttft_ms.p50
    assert compare(base, candidate, parse_fail_on("ttft_ms.p50:5"))[1] == 0


def test_several_gates_in_one_flag_all_apply(suites):
    base, candidate = suites
    edit_run(candidate, "4gpu-dp4", scale_throughput(0.8))
    text, exit_code = compare(base, candidate, parse_fail_on("ttft_ms.p99:5,throughput_tokens_per_s:5"))
    assert exit_code == 1 and "4gpu-dp4 throughput_tokens_per_s: 20.0% worse" in text


def test_a_gate_that_compared_nothing_is_exit_2(suites):
    base, candidate = suites
    for side in suites:
        for path in (side / "runs").glob("*pu-*.json"):
            def cpu(record):
                if record["metrics"]:
                    record["metrics"]["roofline"] = None
                record["null_reasons"]["metrics.roofline"] = "this CPU: no known peak memory bandwidth"
            edit_run(side, path.stem, cpu)
    text, exit_code = compare(base, candidate, parse_fail_on("roofline:5"))
    assert exit_code == 2
    assert ("--fail-on roofline.fraction_of_peak (null in base: this CPU: no known peak memory "
            "bandwidth) compared nothing" in text)
    assert compare(base, candidate, parse_fail_on("throughput_tokens_per_s:5,bubble_fraction:5"))[1] == 0


def test_a_run_missing_from_the_candidate_fails_the_gate_unless_allowed(suites):
    base, candidate = suites
    (candidate / "runs" / "2gpu-dp2.json").unlink()
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE)
    assert exit_code == 1
    assert "Only in base: 2gpu-dp2" in text and "2gpu-dp2: in base, not in candidate" in text
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE, allow_missing=True)
    assert exit_code == 0 and "Only in base: 2gpu-dp2" in text


def test_runs_with_other_ids_are_matched_by_configuration_and_named(suites):
    base, candidate = suites
    for run_id, new_id in (("2gpu-dp2", "2r-dp-tp1-pp1"), ("2gpu-tp2", "2r-tp-tp2-pp1")):
        path = edit_run(candidate, run_id, lambda r, new_id=new_id: r.update(run_id=new_id))
        path.rename(path.with_name(f"{new_id}.json"))
    edit_run(candidate, "2r-tp-tp2-pp1", scale_throughput(0.5))
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE)
    assert exit_code == 1
    assert ("Matched by configuration (strategy, grid, model, workload, engine switches): "
            "2gpu-dp2 (base) = 2r-dp-tp1-pp1 (candidate)") in text
    assert "2gpu-tp2 = 2r-tp-tp2-pp1 (tensor_data_hybrid, world_size 2)" in text
    assert "2gpu-tp2 throughput_tokens_per_s: 50.0% worse" in text
    assert "Only in" not in text


def test_compare_lists_skipped_files(suites):
    text, _ = compare(*suites, [])
    assert "corrupt.json: not valid JSON" in text and "foreign.json: schema is 'pytest-benchmark/4'" in text


def test_the_command_takes_several_gates_and_allow_missing(suites, capsys):
    from gptbench import cli

    base, candidate = suites
    (candidate / "runs" / "2gpu-dp2.json").unlink()
    assert cli.main(["compare", str(base), str(candidate), "--fail-on", "ttft_ms.p99:5,throughput_tokens_per_s:5"]) == 1
    assert cli.main(["compare", str(base), str(candidate), "--fail-on", "ttft_ms.p99:5,throughput_tokens_per_s:5",
                     "--allow-missing"]) == 0
    assert cli.main(["compare", str(base), str(candidate), "--fail-on", "compile_s:5"]) == 2
    assert "compile_s" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["gpu_utilization_pct:5", "gpu_utilization_pct.mean:1"])
def test_gpu_utilisation_never_gates_higher_is_not_better(suites, spec):
    """NVML's utilisation counts an NCCL kernel spin-waiting for a peer as busy: a pipeline
    with bubbles or a straggling tensor rank reads higher, so it must not rank runs."""
    base, candidate = suites
    with pytest.raises(UserError, match="kernel-resident.*ranks nothing"):
        compare(base, candidate, parse_fail_on(spec))


# ---- gates that know noise: intervals and Mann-Whitney on per-batch figures ----------------

def with_batches(rates: list[float], interval_from=None):
    """An edit giving 4gpu-dp4 per-batch figures at `rates` tokens/s (1 s each) and the 95 %
    intervals the record would carry (the real bootstrap)."""
    from gptbench import stats

    def edit(record):
        m = record["metrics"]
        m["batches"] = {"tokens": [round(r) for r in rates], "wall_s": [1.0] * len(rates),
                        "ttft_ms_p50": [m["ttft_ms"]["p50"]] * len(rates),
                        "tpot_ms_p50": [m["tpot_ms"]["p50"]] * len(rates)}
        m["throughput_tokens_per_s"] = sum(round(r) for r in rates) / len(rates)
        factors = stats.ratio_factors(m["batches"]["tokens"], m["batches"]["wall_s"])
        m["intervals"] = {"throughput_tokens_per_s": [m["throughput_tokens_per_s"] * f
                                                      for f in stats.percentile_interval(factors)]}
    return edit


NOISY = [400, 900, 500, 850, 450, 800, 600, 700]       # mean 650, wide spread
NOISY_SLOWER = [360, 820, 430, 760, 400, 700, 520, 640]  # mean ~579: 11 % slower
CLEAN = [648, 652, 650, 649, 651, 650, 652, 648]
CLEAN_SLOWER = [578, 582, 580, 579, 581, 580, 582, 578]  # ~11 % slower, no overlap


@pytest.mark.parametrize("noise", ["intervals", "mann-whitney"])
def test_a_noisy_pair_beyond_the_limit_is_within_noise(suites, noise):
    base, candidate = suites
    edit_run(base, "4gpu-dp4", with_batches(NOISY))
    edit_run(candidate, "4gpu-dp4", with_batches(NOISY_SLOWER))
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE, noise=noise)
    assert exit_code == 0, text
    line = next(line for line in text.splitlines() if "WITHIN NOISE" in line)
    assert "11.0% worse, limit 5%" in line
    assert ("95 % intervals overlap" if noise == "intervals" else "Mann-Whitney p=") in line
    assert "1 change(s) beyond a limit within noise" in text
    assert f"--noise {noise}" in text  # the output says which rule decided


@pytest.mark.parametrize("noise", ["intervals", "mann-whitney"])
def test_a_clean_pair_beyond_the_limit_fails_and_says_why(suites, noise):
    base, candidate = suites
    edit_run(base, "4gpu-dp4", with_batches(CLEAN))
    edit_run(candidate, "4gpu-dp4", with_batches(CLEAN_SLOWER))
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE, noise=noise)
    assert exit_code == 1, text
    regression = next(line for line in text.splitlines() if line.strip().startswith("4gpu-dp4 throughput"))
    assert "10.8% worse, limit 5%" in regression
    assert ("95 % intervals apart" if noise == "intervals" else "Mann-Whitney p=") in regression


def test_without_intervals_or_with_noise_none_the_percentage_alone_decides(suites):
    base, candidate = suites
    edit_run(candidate, "4gpu-tp2-dp2", scale_throughput(0.8))  # fixture records: no intervals
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE)
    assert exit_code == 1 and "percentage alone (no 95 % interval" in text
    edit_run(base, "4gpu-dp4", with_batches(NOISY))
    edit_run(candidate, "4gpu-dp4", with_batches(NOISY_SLOWER))
    text, exit_code = compare(base, candidate, THROUGHPUT_GATE, noise="none")
    assert exit_code == 1 and "4gpu-dp4 throughput_tokens_per_s: 11.0% worse, limit 5%; percentage alone (--noise none)" in text


def test_an_unknown_noise_rule_is_a_user_error(suites):
    with pytest.raises(UserError, match="--noise"):
        compare(*suites, THROUGHPUT_GATE, noise="t-test")
