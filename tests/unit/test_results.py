"""Aggregation rules of the run record, on hand-made per-rank measurements."""
import json
import os
import stat

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


def test_device_level_memory_beside_the_allocators_peak():
    ranks = [rank(0, memory=3000), rank(1, memory=5000)]
    m, reasons = results.aggregate_metrics(ranks, Grid(2, 2, 1, 1), 1)
    assert m["device_memory_used_bytes"] is None and "CUDA" in reasons[
        "metrics.device_memory_used_bytes"]
    for r, used in zip(ranks, (9000, 8000)):
        r["device_used_bytes"] = used  # total - free on the device: NCCL's buffers included
    m, reasons = results.aggregate_metrics(ranks, Grid(2, 2, 1, 1), 1)
    assert m["device_memory_used_bytes"]["per_rank"] == [9000, 8000]
    assert m["device_memory_used_bytes"]["max"] == 9000
    assert "metrics.device_memory_used_bytes" not in reasons


def test_gpu_utilisation_null_on_cpu_with_the_reason():
    m, reasons = results.aggregate_metrics([rank(0), rank(1)], Grid(2, 2, 1, 1), 1)
    assert m["gpu_utilization_pct"] is None
    assert reasons["metrics.gpu_utilization_pct"] == CPU_REASON


def test_gpu_utilisation_mean_and_per_rank():
    m, reasons = results.aggregate_metrics([rank(0, util=80.0), rank(1, util=60.0)],
                                           Grid(2, 2, 1, 1), 1)
    util = m["gpu_utilization_pct"]
    assert {k: util[k] for k in ("mean", "per_rank")} == {"mean": 70.0, "per_rank": [80.0, 60.0]}
    assert util["kind"] == "kernel-resident" and "spin-waiting" in util["source"]
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


# ---- atomic writes ----------------------------------------------------------------------

def test_write_json_atomic_round_trips(tmp_path):
    path = str(tmp_path / "runs" / "a.json")
    record = {"schema": results.SCHEMA, "run_id": "a", "status": "failed", "x": [1, 2.5, None]}
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
    good = {"schema": results.SCHEMA, "run_id": "g", "status": "not_applicable"}
    results.write_json_atomic(str(runs / "good.json"), good)
    records, skipped = results.load_runs(tmp_path)
    assert [r["run_id"] for r in records] == ["g"]
    assert [(p.name, reason.split(":")[0]) for p, reason in skipped] == \
        [("half.json", "not valid JSON"), ("other.json", "schema is 'other/1', not 'gptbench.run/1'")]


def test_records_store_no_speedup_the_reader_derives_it():
    m, reasons = results.aggregate_metrics([rank(0), rank(1)], Grid(2, 2, 1, 1), 1)
    for key in ("speedup", "parallel_efficiency", "scaling", "baseline_run_id"):
        assert m[key] is None
        assert reasons[f"metrics.{key}"] == results.DERIVED


# ---- reading back: field types -----------------------------------------------------------

def finished(**metrics):
    return {"schema": results.SCHEMA, "run_id": "r", "status": "ok",
            "metrics": {"throughput_tokens_per_s": 10.0, **metrics}}


@pytest.mark.parametrize("record, reason", [
    (finished(throughput_tokens_per_s="fast"),
     'metrics.throughput_tokens_per_s is "fast" (str), expected a number or null'),
    (finished(throughput_tokens_per_s=True), "metrics.throughput_tokens_per_s is true (bool)"),
    (finished(throughput_tokens_per_s=float("nan")), "metrics.throughput_tokens_per_s is NaN"),
    (finished(ttft_ms={"p50": "1 ms"}), 'metrics.ttft_ms.p50 is "1 ms" (str)'),
    (finished(ttft_ms=[1, 2]), "metrics.ttft_ms is [1, 2] (list), expected a dict"),
    (finished(peak_memory_bytes={"per_rank": [1, "x"]}), "metrics.peak_memory_bytes.per_rank is"),
    (finished(time_breakdown={"compute": "most"}), "metrics.time_breakdown.compute is"),
    (finished(graph_breaks=1.5), "metrics.graph_breaks is 1.5 (float), expected a int"),
    ({**finished(), "topology": {"world_size": "2"}}, 'topology.world_size is "2" (str)'),
    ({**finished(), "metrics": "none"}, 'metrics is "none" (str), expected a dict'),
    ({**finished(), "metrics": None}, "status is ok but metrics.throughput_tokens_per_s is missing"),
    ({**finished(), "null_reasons": {"metrics.x": 3}}, "null_reasons.metrics.x is 3 (int)"),
    ({**finished(), "run_id": None}, "run_id is None: every record must name its run"),
    ({**finished(), "status": "done"}, "status is 'done', not one of ok, failed"),
])
def test_read_run_names_the_field_of_the_wrong_type(tmp_path, record, reason):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ValueError) as error:
        results.read_run(path)
    assert reason in str(error.value)


def test_read_run_accepts_nulls_and_fields_it_does_not_know(tmp_path):
    record = finished(ttft_ms=None, time_breakdown={"compute": 1.0, "source": "a note"}, new_metric="x")
    record["topology"] = {"world_size": 1, "nodes": None, "hosts": ["a"]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    assert results.read_run(path) == record


def test_a_broken_file_that_duplicates_a_run_id_is_skipped_for_its_own_reason(tmp_path):
    runs = tmp_path / "runs"
    good = finished()
    results.write_json_atomic(str(runs / "r.json"), good)
    results.write_json_atomic(str(runs / "a-broken.json"), finished(throughput_tokens_per_s="fast"))
    results.write_json_atomic(str(runs / "z-copy.json"), good)
    records, skipped = results.load_runs(tmp_path)
    assert records == [good]
    reasons = {p.name: reason for p, reason in skipped}
    assert reasons["a-broken.json"].startswith("metrics.throughput_tokens_per_s is \"fast\"")
    assert reasons["z-copy.json"] == "duplicate run_id 'r'; runs/r.json is used"


def test_the_record_module_depends_on_no_reader():
    """results.py owns the record; the report and compare read through it, never the reverse
    (an import cycle made each half depend on the other)."""
    import ast

    tree = ast.parse(open(results.__file__, encoding="utf-8").read())
    imported = {f"{node.module}.{alias.name}" if node.module == "gptbench" else node.module
                for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    # the writer's side: figures (breakdown, bubble) and parity aggregate what ranks measured
    assert imported <= {"__future__", "datetime", "json", "math", "os", "tempfile", "pathlib",
                        "gptbench.errors", "gptbench.stats", "gptbench.figures",
                        "gptbench.parity", "gptbench.config"}, imported



@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path, umask):
    """mkstemp creates 0600 files: records and reports would be private to their writer."""
    previous = os.umask(umask)
    try:
        results.write_json_atomic(str(tmp_path / "record.json"), {"a": 1})
        results.write_atomic(str(tmp_path / "report.html"), b"<html></html>")
        with open(tmp_path / "plain.txt", "w", encoding="utf-8") as f:
            f.write("x")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert expected == 0o666 & ~umask
    for name in ("record.json", "report.html"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name
