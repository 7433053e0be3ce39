"""Speedup, efficiency and the scaling label, derived from the records present."""
import pytest

from gptbench import results, scaling


def record(run_id, strategy, world, throughput, dp=None, tp=1, pp=1, batch_size=4, status="ok",
           device="AMD EPYC (test)", created_at="2025-01-01T10:00:00Z", **engine):
    return {
        "schema": results.SCHEMA, "run_id": run_id, "status": status, "strategy": strategy,
        "created_at": created_at,
        "topology": {"world_size": world, "dp": world // (tp * pp) if dp is None else dp, "tp": tp, "pp": pp},
        "model": {"name": "tiny", "preset": "tiny"},
        "workload": {"dtype": "float32", "batch_size": batch_size, "input_len": 32,
                     "output_len": 8, "num_samples": 8},
        "engine": {"backend": "deepspeed", "kernel_inject": False, **engine},
        "env": {"device": "cpu", "device_name": device},
        "metrics": {"throughput_tokens_per_s": throughput, "speedup": 9.9,  # stale, must be replaced
                    "parallel_efficiency": None, "scaling": None, "baseline_run_id": None},
        "null_reasons": {f"metrics.{k}": results.DERIVED for k in results.DERIVED_KEYS},
    }


def by_id(records):
    return {r["run_id"]: r for r in scaling.derive(records)}


def test_speedup_and_efficiency_against_the_one_rank_baseline():
    runs = by_id([record("1r-dp", "pure_data_parallel", 1, 150.0),
                  record("4r-tp", "tensor_data_hybrid", 4, 300.0, tp=4)])
    m = runs["4r-tp"]["metrics"]
    assert m["speedup"] == 2.0 and m["parallel_efficiency"] == 0.5
    assert m["baseline_run_id"] == "1r-dp"
    assert not any(k.startswith("metrics.speedup") for k in runs["4r-tp"]["null_reasons"])
    base = runs["1r-dp"]["metrics"]
    assert (base["speedup"], base["parallel_efficiency"], base["scaling"]) == (1.0, 1.0, "baseline")


def test_rerunning_the_baseline_moves_every_speedup():
    others = [record("2r-dp", "pure_data_parallel", 2, 300.0), record("2r-tp", "tensor_data_hybrid", 2, 120.0, tp=2)]
    before = by_id([record("1r-dp", "pure_data_parallel", 1, 150.0)] + others)
    after = by_id([record("1r-dp", "pure_data_parallel", 1, 100.0)] + others)
    assert before["2r-dp"]["metrics"]["speedup"] == 2.0 and after["2r-dp"]["metrics"]["speedup"] == 3.0
    assert before["2r-tp"]["metrics"]["speedup"] == 0.8 and after["2r-tp"]["metrics"]["speedup"] == 1.2


@pytest.mark.parametrize("run, label", [
    (record("2r-dp", "pure_data_parallel", 2, 1.0), "weak"),
    (record("2r-tp", "tensor_data_hybrid", 2, 1.0, tp=2), "strong"),
    (record("2r-pp", "pipeline_data_hybrid", 2, 1.0, pp=2), "strong"),
    (record("4r-full", "full_model_parallel", 4, 1.0, tp=2, pp=2), "strong"),
    (record("4r-tp2-dp2", "tensor_data_hybrid", 4, 1.0, tp=2), "weak"),
    (record("1r-dp", "pure_data_parallel", 1, 1.0), "baseline"),
])
def test_the_label_says_what_the_run_did(run, label):
    assert scaling.label(run) == label
    assert by_id([record("base", "pure_data_parallel", 1, 1.0), run])[run["run_id"]]["metrics"]["scaling"] == label


@pytest.mark.parametrize("change", [
    {"batch_size": 2}, {"device": "another CPU"}, {"kernel_inject": True}, {"compile": "default"},
    {"backend": "hf_eager"}, {"status": "failed"},
])
def test_a_baseline_must_match_device_workload_and_engine_switches(change):
    run = record("2r-dp", "pure_data_parallel", 2, 300.0)
    base = record("1r-dp", "pure_data_parallel", 1, 150.0, **change)
    m = by_id([base, run])["2r-dp"]
    assert m["metrics"]["speedup"] is None and m["metrics"]["parallel_efficiency"] is None
    assert m["metrics"]["scaling"] == "weak"  # what the run did does not need a baseline
    assert m["null_reasons"]["metrics.speedup"] == scaling.NO_BASELINE


def test_a_missing_engine_switch_is_off():
    old = record("1r-dp", "pure_data_parallel", 1, 150.0)
    del old["engine"]["backend"]
    new = record("2r-dp", "pure_data_parallel", 2, 300.0, compile="off", cuda_graph=False)
    assert by_id([old, new])["2r-dp"]["metrics"]["speedup"] == 2.0


def test_the_newest_baseline_wins():
    runs = by_id([record("1r-old", "pure_data_parallel", 1, 100.0, created_at="2025-01-01T09:00:00Z"),
                  record("1r-new", "pure_data_parallel", 1, 150.0, created_at="2025-01-01T11:00:00Z"),
                  record("2r-dp", "pure_data_parallel", 2, 300.0)])
    assert runs["2r-dp"]["metrics"]["baseline_run_id"] == "1r-new"


def test_unfinished_runs_keep_no_stale_figure_and_inputs_are_not_changed():
    failed = record("2r-dp", "pure_data_parallel", 2, None, status="failed")
    failed["metrics"]["scaling"] = "weak"
    base = record("1r-dp", "pure_data_parallel", 1, 150.0)
    derived = by_id([base, failed])["2r-dp"]["metrics"]
    assert all(derived[k] is None for k in results.DERIVED_KEYS)
    assert failed["metrics"]["scaling"] == "weak" and base["metrics"]["speedup"] == 9.9


# ---- the speedup's interval: a bootstrap of the ratio from the two runs' batches -----------

def with_batches(rec, tokens, wall):
    rec["metrics"]["batches"] = {"tokens": tokens, "wall_s": wall}
    rec["metrics"]["intervals"] = {"throughput_tokens_per_s": None}
    return rec


def test_speedup_interval_brackets_the_speedup_and_efficiency_is_it_over_ranks():
    base = with_batches(record("1r-dp", "pure_data_parallel", 1, 150.0),
                        [16] * 8, [0.1, 0.12, 0.09, 0.11, 0.1, 0.13, 0.1, 0.1])
    run = with_batches(record("2r-dp", "pure_data_parallel", 2, 300.0),
                       [32] * 8, [0.1, 0.11, 0.1, 0.09, 0.12, 0.1, 0.1, 0.1])
    m = by_id([base, run])["2r-dp"]["metrics"]
    low, high = m["intervals"]["speedup"]
    assert low < m["speedup"] == 2.0 < high
    assert m["intervals"]["parallel_efficiency"] == pytest.approx([low / 2, high / 2])
    assert "bootstrap of the ratio" in m["intervals"]["ratio_method"]
    # the baseline against itself draws the same resamples: exactly 1
    assert by_id([base, run])["1r-dp"]["metrics"]["intervals"]["speedup"] == [1.0, 1.0]


def test_noisier_batches_give_a_wider_speedup_interval():
    base = with_batches(record("1r-dp", "pure_data_parallel", 1, 150.0), [16] * 8, [0.1] * 8)
    steady = with_batches(record("2r-dp", "pure_data_parallel", 2, 300.0), [32] * 8,
                          [0.1, 0.101, 0.099, 0.1, 0.1, 0.1, 0.101, 0.099])
    noisy = with_batches(record("2r-dp", "pure_data_parallel", 2, 300.0), [32] * 8,
                         [0.06, 0.14, 0.08, 0.12, 0.1, 0.07, 0.13, 0.1])

    def width(run):
        low, high = by_id([base, run])["2r-dp"]["metrics"]["intervals"]["speedup"]
        return high - low
    assert width(noisy) > 10 * width(steady) > 0


def test_without_batches_or_baseline_the_interval_is_null_with_the_reason():
    base = record("1r-dp", "pure_data_parallel", 1, 150.0)  # written before batches existed
    run = with_batches(record("2r-dp", "pure_data_parallel", 2, 300.0), [32] * 4, [0.1] * 4)
    derived = by_id([base, run])["2r-dp"]
    assert derived["metrics"]["intervals"]["speedup"] is None
    assert derived["null_reasons"]["metrics.intervals.speedup"] == scaling.NO_BATCHES
    alone = by_id([run])["2r-dp"]
    assert alone["null_reasons"]["metrics.intervals.parallel_efficiency"] == scaling.NO_BASELINE
    assert "intervals" not in by_id([base])["1r-dp"]["metrics"]  # an old record stays as it was
