"""Aggregation rules of the run record, on hand-made per-rank measurements."""
import copy
import json
import os

import pytest

from gptbench import results
from gptbench.topology import Grid

CPU_REASON = "no GPU on this rank (cpu)"


def rank(r, *, is_output=True, wall=(1.0,), tokens=(100,), ttft=(0.01,), tpot=(0.002,),
         e2e=(0.03,), memory=1000, reserved=None, util=None, parity=None):
    """One rank's dict as `measure.measure_rank` + `worker.run_rank` return it."""
    return {
        "rank": r, "is_output": is_output,
        "ttft_s": list(ttft), "tpot_s": list(tpot), "e2e_s": list(e2e),
        "iteration_wall_s": list(wall), "iteration_tokens": list(tokens),
        "timed_wall_s": sum(wall), "generated_tokens": sum(tokens),
        "decode_input_lens": [1],
        "peak_memory_bytes": memory, "peak_reserved_bytes": reserved, "memory_kind": "rss",
        "gpu_util_pct": util, "gpu_util_reason": None if util is not None else CPU_REASON,
        "parity": parity, "params": 10,
    }


# ---- throughput -------------------------------------------------------------------------

def test_data_parallel_replicas_add_up_over_the_slowest_wall():
    ranks = [rank(0, wall=(1.0,), tokens=(100,)), rank(1, wall=(2.0,), tokens=(100,))]
    m, _ = results.aggregate_metrics(ranks, Grid(2, 2, 1, 1), 1)
    assert m["generated_tokens"] == 200
    assert m["timed_wall_s"] == 2.0
    assert m["throughput_tokens_per_s"] == 100.0  # not mean(100, 50) = 75, not 100 + 50
    assert m["throughput_iterations"] == [100.0]


def test_throughput_per_iteration_uses_the_slowest_rank_of_each_iteration():
    ranks = [rank(0, wall=(1.0, 4.0), tokens=(100, 100)),
             rank(1, wall=(2.0, 1.0), tokens=(100, 100))]
    m, reasons = results.aggregate_metrics(ranks, Grid(2, 2, 1, 1), 1)
    assert m["throughput_iterations"] == [100.0, 50.0]
    assert m["throughput_tokens_per_s"] == 400 / 5.0  # rank 0 is slowest overall (5 s)
    assert m["throughput_cv_pct"] == pytest.approx(100 * 35.35533905932738 / 75)
    assert "metrics.throughput_cv_pct" not in reasons


def test_one_iteration_has_no_cv_and_says_why():
    m, reasons = results.aggregate_metrics([rank(0)], Grid(1, 1, 1, 1), 1)
    assert m["throughput_cv_pct"] is None and "metrics.throughput_cv_pct" in reasons


def test_tensor_parallel_ranks_of_one_replica_count_once():
    grid = Grid(2, 1, 2, 1)
    assert grid.output_ranks() == [0]
    ranks = [rank(0, wall=(2.0,), tokens=(100,), ttft=(0.5,)),
             rank(1, is_output=False, wall=(2.0,), tokens=(100,), ttft=(9.0,))]
    m, _ = results.aggregate_metrics(ranks, grid, 1)
    assert m["generated_tokens"] == 100
    assert m["throughput_tokens_per_s"] == 50.0
    # latencies are taken where the tokens appear, once per replica
    assert m["ttft_ms"]["count"] == 1 and m["ttft_ms"]["mean"] == 500.0


def test_tp_x_dp_counts_one_rank_per_replica():
    grid = Grid(4, 2, 2, 1)
    ranks = [rank(r, is_output=r in grid.output_ranks(), wall=(4.0 if r == 3 else 2.0,),
                  tokens=(60,)) for r in range(4)]
    m, _ = results.aggregate_metrics(ranks, grid, 1)
    assert m["generated_tokens"] == 120
    assert m["throughput_tokens_per_s"] == 30.0  # a slow non-output rank still sets the wall


def test_latency_percentiles_pool_every_replica():
    ranks = [rank(0, ttft=(0.001, 0.002), tpot=(0.001,), e2e=(0.004,)),
             rank(1, ttft=(0.003, 0.004), tpot=(0.003,), e2e=(0.008,))]
    m, _ = results.aggregate_metrics(ranks, Grid(2, 2, 1, 1), 1)
    assert m["ttft_ms"]["count"] == 4
    assert m["ttft_ms"]["mean"] == pytest.approx(2.5)
    assert m["ttft_ms"]["p50"] == pytest.approx(2.5)
    assert m["tpot_ms"]["mean"] == pytest.approx(2.0)
    assert m["e2e_ms"]["max"] == pytest.approx(8.0)


# ---- memory, utilisation, communication -------------------------------------------------

def test_memory_per_rank_and_max_never_summed():
    ranks = [rank(0, memory=3000), rank(1, memory=5000), rank(2, memory=4000)]
    m, reasons = results.aggregate_metrics(ranks, Grid(3, 3, 1, 1), 1)
    assert m["peak_memory_bytes"]["per_rank"] == [3000, 5000, 4000]
    assert m["peak_memory_bytes"]["max"] == 5000
    assert m["peak_memory_bytes"]["kind"] == "rss"
    assert m["peak_reserved_bytes"] is None and "metrics.peak_reserved_bytes" in reasons


def test_reserved_memory_when_every_rank_has_it():
    ranks = [rank(0, reserved=7000), rank(1, reserved=6000)]
    m, reasons = results.aggregate_metrics(ranks, Grid(2, 2, 1, 1), 1)
    assert m["peak_reserved_bytes"] == {"per_rank": [7000, 6000], "max": 7000}
    assert "metrics.peak_reserved_bytes" not in reasons


def test_gpu_utilisation_null_on_cpu_with_the_reason():
    m, reasons = results.aggregate_metrics([rank(0), rank(1)], Grid(2, 2, 1, 1), 1)
    assert m["gpu_utilization_pct"] is None
    assert reasons["metrics.gpu_utilization_pct"] == CPU_REASON


def test_gpu_utilisation_mean_and_per_rank():
    m, reasons = results.aggregate_metrics([rank(0, util=80.0), rank(1, util=60.0)],
                                           Grid(2, 2, 1, 1), 1)
    assert m["gpu_utilization_pct"] == {"mean": 70.0, "per_rank": [80.0, 60.0]}
    assert "metrics.gpu_utilization_pct" not in reasons


def test_profile_metrics_null_with_reason_when_not_profiled():
    # What the time breakdown holds is tested in test_breakdown.py.
    m, reasons = results.aggregate_metrics([rank(0), rank(1)], Grid(2, 2, 1, 1), 1)
    assert m["time_breakdown"] is None and m["comm_fraction"] is None
    assert m["bubble_fraction"] is None
    assert "profile_comm" in reasons["metrics.time_breakdown"]


# ---- parity across ranks ----------------------------------------------------------------

def test_no_parity_checks_gives_none():
    assert results.aggregate_parity([rank(0), rank(1)]) is None


# ---- baseline, speedup, efficiency ------------------------------------------------------

def record(run_id, strategy, world, throughput, batch_size=4, status="ok"):
    return {
        "schema": results.SCHEMA, "run_id": run_id, "status": status, "strategy": strategy,
        "topology": {"world_size": world},
        "model": {"name": "tiny", "preset": "tiny"},
        "workload": {"dtype": "float32", "batch_size": batch_size, "input_len": 32,
                     "output_len": 8, "num_samples": 8},
        "engine": {"backend": "deepspeed", "kernel_inject": False},
        "metrics": {"throughput_tokens_per_s": throughput, "speedup": None,
                    "parallel_efficiency": None, "scaling": None, "baseline_run_id": None},
        "null_reasons": {},
    }


def test_speedup_and_efficiency_against_the_one_rank_baseline():
    base = record("1r-dp", "pure_data_parallel", 1, 150.0)
    run = record("4r-tp", "tensor_data_hybrid", 4, 300.0)
    results.apply_baseline(run, [record("2r-dp", "pure_data_parallel", 2, 280.0), base])
    m = run["metrics"]
    assert m["speedup"] == 2.0
    assert m["parallel_efficiency"] == 0.5  # speedup / world_size
    assert m["baseline_run_id"] == "1r-dp" and m["scaling"] == "weak"
    assert not any(k.startswith("metrics.speedup") for k in run["null_reasons"])


def test_baseline_of_a_different_workload_is_not_used():
    run = record("2r-dp", "pure_data_parallel", 2, 300.0)
    run["null_reasons"]["metrics.speedup"] = "stale"
    results.apply_baseline(run, [record("1r-dp-b2", "pure_data_parallel", 1, 150.0, batch_size=2),
                                 record("1r-tp", "tensor_data_hybrid", 1, 150.0),
                                 record("1r-failed", "pure_data_parallel", 1, 150.0,
                                        status="failed")])
    m = run["metrics"]
    assert m["speedup"] is None and m["parallel_efficiency"] is None
    assert m["baseline_run_id"] is None
    for k in ("speedup", "parallel_efficiency"):
        assert "one-rank pure_data_parallel" in run["null_reasons"][f"metrics.{k}"]


def test_baseline_needs_the_same_model():
    run = record("2r-dp", "pure_data_parallel", 2, 300.0)
    other = record("1r-dp", "pure_data_parallel", 1, 150.0)
    other["model"] = {"name": "gpt2-xl", "preset": None}
    results.apply_baseline(run, [other])
    assert run["metrics"]["speedup"] is None


def test_failed_run_gets_no_baseline():
    run = record("2r-dp", "pure_data_parallel", 2, 300.0, status="failed")
    before = copy.deepcopy(run)
    results.apply_baseline(run, [record("1r-dp", "pure_data_parallel", 1, 150.0)])
    assert run == before


# ---- atomic writes ----------------------------------------------------------------------

def test_write_json_atomic_round_trips(tmp_path):
    path = str(tmp_path / "runs" / "a.json")
    record = {"schema": results.SCHEMA, "run_id": "a", "status": "ok", "x": [1, 2.5, None]}
    results.write_json_atomic(path, record)
    assert json.load(open(path, encoding="utf-8")) == record
    assert results.read_record(path)["x"] == [1, 2.5, None]
    assert os.listdir(tmp_path / "runs") == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "a.json")
    results.write_json_atomic(path, {"version": 1})
    with pytest.raises(TypeError):
        results.write_json_atomic(path, {"version": 2, "bad": object()})
    assert json.load(open(path, encoding="utf-8")) == {"version": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_read_record_skips_corrupt_and_foreign_files(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "half.json").write_text('{"schema": "gptbench.run/1", "run', encoding="utf-8")
    (runs / "other.json").write_text('{"schema": "other/1"}', encoding="utf-8")
    good = {"schema": results.SCHEMA, "run_id": "g", "status": "ok"}
    results.write_json_atomic(str(runs / "good.json"), good)
    assert [r["run_id"] for r in results.load_records(str(tmp_path))] == ["g"]
