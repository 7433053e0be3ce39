"""`make bench-cpu`'s arithmetic and bench.json shape. No timing targets here: the one
measurement is a tiny in-process overhead run, checked for shape and positivity only."""
import json
import os

import pytest

from gptbench import benchcpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ["model.name=tiny", "model.preset=tiny", "workload.batch_size=2",
        "workload.input_len=8", "workload.output_len=4", "workload.num_samples=4",
        "parity.samples=1", "parity.tokens=2"]


def _record(status="ok", throughput=100.0, ranks=1, comm=None, bubble=None, passed=True):
    metrics = {"throughput_tokens_per_s": throughput, "comm_fraction": comm,
               "bubble_fraction": bubble, "tpot_ms": {"p50": 2.0}, "ttft_ms": {"p50": 9.0},
               "throughput_cv_pct": 1.0} if status == "ok" else None
    return {"run_id": f"{ranks}r", "status": status,
            "error": None if status == "ok" else "rank 1: boom", "metrics": metrics,
            "topology": {"dp": ranks, "tp": 1, "pp": 1}, "engine": {"threads_per_rank": 1},
            "parity": {"passed": passed, "max_abs_logit_diff": 1e-6} if status == "ok" else None,
            "wall_s": 12.0}


def test_main_writes_bench_json_with_positive_overhead_numbers(tmp_path):
    code = benchcpu.main(str(tmp_path), overrides=TINY, repeats=2, with_deepspeed=False,
                         scaling=False)
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["schema"] == benchcpu.SCHEMA
    assert report["overhead_ratio"] > 0
    assert isinstance(report["overhead_passed"], bool)
    arms = report["overhead"]["arms"]
    for name in ("bare_hf_generate", "gptbench_hf"):
        assert len(arms[name]["tokens_per_s"]) == 4  # 2 repeats x 2 batches
        assert all(x > 0 for x in arms[name]["tokens_per_s"])
        assert all(x is None or x > 0 for x in arms[name]["tokens_per_cpu_s"])
    assert report["overhead_ratio_cpu_time"] > 0
    assert arms["gptbench_hf"]["tokens_match_bare"] is True
    assert arms["gptbench_deepspeed"]["tokens_per_s"] is None
    assert "with_deepspeed=False" in report["overhead_deepspeed_skipped"]
    assert report["overhead"]["workload"]["batches"] == 2
    assert report["scaling"] == {} and report["scaling_baseline"] is None
    assert {"git_commit", "device_name", "torch"} <= set(report["env"])


def test_paired_ratio_is_the_median_of_per_pair_ratios():
    assert benchcpu.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert benchcpu.paired_ratio([None, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.5
    assert benchcpu.paired_ratio([None], [1.0]) is None


def test_scaling_row_speedup_and_efficiency_against_the_baseline():
    base = _record(throughput=100.0)
    row = benchcpu.scaling_row(_record(throughput=150.0, ranks=2, comm=0.25,
                                       bubble={"measured": 0.4, "theory": 1 / 3}), 2, base)
    assert row["speedup"] == pytest.approx(1.5)
    assert row["parallel_efficiency"] == pytest.approx(0.75)
    assert row["comm_fraction"] == 0.25
    assert row["bubble_fraction_measured"] == 0.4
    assert row["tpot_ms_p50"] == 2.0 and row["parity_passed"] is True


def test_scaling_row_of_a_failed_run_or_without_baseline_has_no_speedup():
    failed = benchcpu.scaling_row(_record(status="failed", ranks=2), 2, _record())
    assert failed["speedup"] is None and failed["throughput_tokens_per_s"] is None
    assert failed["error"] == "rank 1: boom"
    orphan = benchcpu.scaling_row(_record(throughput=80.0, ranks=2), 2, _record(status="failed"))
    assert orphan["throughput_tokens_per_s"] == 80.0 and orphan["speedup"] is None


def _report(ratio):
    overhead = {"model": {"preset": "tiny", "name": "tiny", "params": 4e5},
                "workload": {"dtype": "float32", "batch_size": 2, "input_len": 8,
                             "output_len": 4, "batches": 1},
                "threads": 1, "pairs": 3,
                "arms": {"bare_hf_generate": {"tokens_per_s_median": 100.0, "tokens_per_s": [100.0]},
                         "gptbench_hf": {"tokens_per_s_median": 100.0 * ratio,
                                         "tokens_per_s": [100.0 * ratio],
                                         "tokens_match_bare": True, "ratio_to_bare": ratio},
                         "gptbench_deepspeed": {"tokens_per_s": None, "skipped": "no deepspeed"}}}
    base = _record()
    rows = {"tensor_data_hybrid": benchcpu.scaling_row(_record(throughput=90.0, ranks=2), 2, base)}
    return benchcpu.build_report(overhead, benchcpu.scaling_row(base, 1, base), rows,
                                 {"git_commit": "abc"}, 1.0)


def test_table_says_met_or_not_met_and_names_every_row():
    assert _report(0.9)["overhead_passed"] is False
    low, ok = benchcpu.format_table(_report(0.9)), benchcpu.format_table(_report(1.0))
    assert "not met" in low and ": met" not in low
    assert ": met" in ok and "not met" not in ok
    assert "tensor_data_hybrid" in ok and "1 rank (baseline)" in ok
    assert "skipped: no deepspeed" in ok
    assert "0.45" in ok  # tp: 90/100 over 2 ranks


def test_load_note_warns_when_other_work_shared_the_cpus():
    assert benchcpu.load_note(2.5, 2).startswith("WARNING")
    assert "idle" in benchcpu.load_note(0.1, 2)
