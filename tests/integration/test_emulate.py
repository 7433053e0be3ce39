"""Emulation (gptbench/emulate.py) against real runs of the same configurations, the one
prediction's arithmetic (gptbench/predict.py), and the compiled fake-group proof.

Real side: multi-process DeepSpeed runs on gloo (tiny 5-head model). Emulated side: the same
configurations through `gptbench suite FILE --emulate` (one child process, the fake process
group). A role is built by the strategy's own code, so what each emulated rank holds must
be what the real rank held: parameters per rank, heads per tensor rank, stage layers.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

from gptbench import emulate, interconnect, predict, results, sharding
from gptbench.roofline import ModelDims
from gptbench.topology import make_grid
from paths import ROOT
from paths import TINY_CPU as CONFIG
from sweeps import run_sweeps

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
SCHEDULE = "topology.pipeline_schedule"
RUNS = {
    "tp2": (2, {"strategy": "tensor_data_hybrid", "topology.tp": 2}),
    "tp4": (4, {"strategy": "tensor_data_hybrid", "topology.tp": 4}),
    "pp2": (2, {"strategy": "pipeline_data_hybrid", "topology.pp": 2}),
    "pp2-flush": (2, {"strategy": "pipeline_data_hybrid", "topology.pp": 2, SCHEDULE: "flush"}),
    "full": (4, {"strategy": "full_model_parallel", "topology.tp": 2, "topology.pp": 2}),
}
COMMON = ["workload.num_samples=4", "workload.iterations=1", "workload.warmup=0",
          "parity.samples=4", "parity.tokens=4", "engine.comm_timeout_s=60", "timeout_s=600",
          "engine.threads=1", "engine.profile_comm=false"]


def _pairs(sets: dict) -> list[str]:
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """{id: (real record, emulated record)}."""
    out = tmp_path_factory.mktemp("emulate")
    real = run_sweeps(out, CONFIG, {k: (r, s) for k, (r, s) in RUNS.items()}, COMMON, 900)
    suite = out / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "title": "emulated", "base": CONFIG, "output_dir": str(out),
        "set": {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in COMMON)},
        "runs": [{"id": k, "ranks": r, "set": s} for k, (r, s) in RUNS.items()]}))
    proc = subprocess.run([PY, "-m", "gptbench.cli", "suite", str(suite), "--emulate",
                           "--interconnect", "nvlink4"], env=ENV, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    emulated = {k: results.read_record(results.run_path(str(out), "emu-" + k)) for k in RUNS}
    return {k: (real[k], emulated[k]) for k in RUNS}, out


@pytest.mark.parametrize("run_id", list(RUNS))
def test_each_emulated_rank_holds_what_the_real_rank_held(both, run_id):
    real, emu = both[0][run_id]
    assert real and real["status"] == "ok", real and real.get("error")
    assert emu["status"] == "ok", emu.get("error")
    rt, et = real["topology"], emu["topology"]
    assert et["heads_per_tp_rank"] == rt["heads_per_tp_rank"]
    assert et["stage_layers"] == rt["stage_layers"]
    grid = make_grid(real["strategy"], rt["world_size"], rt["tp"], rt["pp"])
    roles = {(r["stage"], t): r for r in emu["emulation"]["roles"] for t in r["tp_ranks"]}
    for rank, params in enumerate(rt["params_per_rank"]):
        p, _, t = grid.coords(rank)
        assert roles[(p, t)]["params"] == params, (rank, roles[(p, t)])


@pytest.mark.parametrize("run_id", list(RUNS))
def test_the_emulated_timing_path_ran_and_reports_no_tokens(both, run_id):
    real, emu = both[0][run_id]
    results.check_fields(emu)
    roles = emu["emulation"]["roles"]
    assert all(r["decode_ms"] > 0 and r["prefill_ms"] > 0 for r in roles)
    assert all(r["decode_samples"] == 4 // 4 * (8 - 1) for r in roles)  # 1 batch x 7 steps
    m = emu["metrics"]
    assert m["tpot_ms"]["p50"] == m["predicted"]["tpot_ms"] > 0
    assert m["throughput_tokens_per_s"] == pytest.approx(
        4 * 8 / (m["predicted"]["e2e_ms"] / 1e3))
    assert emu["parity"] is None and "no tokens" in emu["null_reasons"]["parity"]
    assert "tokens" not in json.dumps(emu["emulation"]).replace("tokens_per_s", "")
    assert emu["run_id"] == "emu-" + run_id
    assert emu["topology"]["pipeline_schedule"] == real["topology"]["pipeline_schedule"]


def test_distinct_roles_only_and_identical_roles_timed_once(both):
    _, out = both
    emu = {k: results.read_record(results.run_path(str(out), "emu-" + k)) for k in RUNS}
    assert [r["tp_ranks"] for r in emu["tp4"]["emulation"]["roles"]] == [[0], [1, 2, 3]]
    assert len(emu["full"]["emulation"]["roles"]) == 4
    # the in-flight and flush rows run the same stage function: the second is cached
    assert not any(r["cached"] for r in emu["pp2"]["emulation"]["roles"])
    assert all(r["cached"] for r in emu["pp2-flush"]["emulation"]["roles"])


def test_the_report_keeps_emulated_rows_apart(both):
    from gptbench.report.render import render_report

    _, out = both
    render_report(out)
    text = (out / "report.md").read_text()
    measured, emulated = text.split("## Emulated rows", 1)
    assert "emu-tp2" not in measured and "| tp2 |" in measured
    assert "emu-tp2" in emulated and (out / "emulated.png").exists()


# --- roles and scope, no process needed -------------------------------------------

def test_uneven_heads_and_stages_give_the_distinct_roles():
    as_list = lambda g: [(r.stage, r.tp_ranks, r.heads) for r in emulate.roles(g, 5)]  # noqa: E731
    assert as_list(make_grid("tensor_data_hybrid", 2, 2, None)) == [(0, (0,), 3), (0, (1,), 2)]
    assert as_list(make_grid("tensor_data_hybrid", 4, 4, None)) == [(0, (0,), 2), (0, (1, 2, 3), 1)]
    assert as_list(make_grid("pure_data_parallel", 4, None, None)) == [(0, (0,), 5)]
    assert [r.rank for r in emulate.roles(make_grid("full_model_parallel", 4, 2, 2), 5)] == [0, 1, 2, 3]
    assert len(emulate.roles(make_grid("tensor_data_hybrid", 4, 4, None), 8)) == 1  # 2/2/2/2


def test_more_ranks_than_cores_is_labelled_out_of_scope():
    from gptbench.config import load_config

    cores = len(os.sched_getaffinity(0))
    cfg = load_config(CONFIG, ["strategy=tensor_data_hybrid", "topology.tp=2",
                               f"engine.threads={cores}"])
    assert not emulate.scope(emulate.plan_for(cfg, 2))["in_scope"]
    assert "cores" in emulate.scope(emulate.plan_for(cfg, 2))["reason"]
    cfg = load_config(CONFIG, ["engine.threads=1"])
    assert emulate.scope(emulate.plan_for(cfg, 1))["in_scope"]


def test_a_not_applicable_row_is_recorded(tmp_path):
    record = emulate.emulate_row(CONFIG, ["strategy=full_model_parallel", f"output_dir={tmp_path}",
                                          "run_id=full2"], 2, emulate.RoleCache(), None, "none")
    assert record["status"] == "not_applicable" and record["run_id"] == "emu-full2"
    assert results.read_record(results.run_path(str(tmp_path), "emu-full2"))


@pytest.mark.parametrize("args", [["--interconnect", "bogus"],
                                  ["--interconnect", "pcie4", "--comm-file", "x.json"]])
def test_bad_latency_input_is_one_line_and_exit_2(args, tmp_path):
    proc = subprocess.run([PY, "-m", "gptbench.cli", "emulate", "--config", CONFIG,
                           "--set", f"output_dir={tmp_path}", *args], env=ENV,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


# --- the one prediction's arithmetic ---------------------------------------------

TINY = ModelDims.of({"n_layer": 4, "n_head": 5, "n_embd": 320, "vocab_size": 50257,
                     "n_positions": 1024})


def _layout(tp=1, pp=1, m=1, schedule="flush"):
    return sharding.layout(TINY, 1, tp, pp, m, 4, 32, 8, 4, schedule, "uniform")


def test_one_device_ttft_tpot_e2e_and_tokens_per_s():
    p = predict.predict(_layout(), [0.010], [0.002], None, "c", "l")
    assert p["ttft_ms"] == pytest.approx(10) and p["tpot_ms"] == pytest.approx(2)
    assert p["e2e_ms"] == pytest.approx(10 + 7 * 2)
    assert p["tokens_per_s"] == pytest.approx(4 * 8 / 0.024)


def test_pipeline_prefill_flush_and_in_flight():
    # equal stages, prefill P per stage for the whole batch, m = 2: ticks P/2
    flush = predict.prefill_s(_layout(pp=2, m=2, schedule="flush"), [0.02, 0.02], None)
    assert flush == pytest.approx((0.03, 0.03))  # sum + (m-1) max = 1.5 P
    inflight = predict.prefill_s(_layout(pp=2, m=2, schedule="in_flight"), [0.02, 0.02], None)
    assert inflight == pytest.approx((0.025, 0.03))  # micro-batches' first tokens: P, 1.5 P


def test_prefill_collectives_carry_every_position():
    lay = _layout(tp=2)
    decode, prefill = lay.collectives(), lay.collectives(tokens=32)
    assert prefill[0].nbytes == 32 * decode[0].nbytes  # block all-reduces: (mb, T, d)
    assert prefill[1].nbytes == decode[1].nbytes       # logits: last position only


def test_tensor_parallel_adds_its_all_reduces_at_the_interconnect_latency():
    link = interconnect.profile("nvlink4")
    lay = _layout(tp=2)
    p = predict.predict(lay, [0.01], [0.002], link.lookup_us, "c", "l")
    expected = sum(c.per_step * link.lookup_us(c.op, c.group_size, c.nbytes)
                   for c in lay.collectives()) / 1e3
    assert p["tpot_ms"] == pytest.approx(2 + expected)
    assert link.lookup_us("all_reduce", 2, 12800) == pytest.approx(6 + 12800 / 370e3)


def test_unknown_interconnect_is_bad_input():
    from gptbench.errors import UserError

    with pytest.raises(UserError, match="nvlink4"):
        interconnect.profile("nvlink9")


# --- proof (a): compiled tensor parallel under the fake process group --------------

def test_a_compiled_tp2_shard_has_no_graph_break_and_its_all_reduce_in_code():
    script = ("import json; from gptbench.emulate_proof import prove; print(json.dumps(prove("
              f"{CONFIG!r}, ['strategy=tensor_data_hybrid', 'topology.tp=2', "
              "'engine.compile=default', 'engine.threads=1'], 2)))")
    proc = subprocess.run([PY, "-c", script], env=ENV, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heads_on_rank"] == 3 and result["graph_breaks"] == 0
    assert result["graphs"] >= 2  # prefill and decode
    assert result["all_reduce_in_code"], result


def test_an_unpipelined_rows_compute_is_its_timed_steps_median_less_collectives():
    from gptbench.figures import rank_step_compute_s

    phase = {"decode_step_median": {"compute_s": 0.010, "communication_s": 0.004,
                                    "waiting_s": 0.001}}
    timed = [0.020, 0.009, 0.008, 0.030, 0.0085]  # a descheduled step does not move it
    assert rank_step_compute_s({"decode_steps": 3}, phase, timed) == pytest.approx(0.009 - 0.005)
    assert rank_step_compute_s({"decode_steps": 3}, phase, []) == 0.010


def test_bench_pairs_each_real_row_with_its_emulation(both):
    from gptbench.benchemulate import compare_rows, summary

    records, out = both
    rows = {r["run_id"]: r for r in compare_rows(str(out / "runs"))}
    assert set(rows) == set(RUNS)
    real, emu = records["tp2"]
    assert rows["tp2"]["measured_over_emulated"] == pytest.approx(
        real["metrics"]["tpot_ms"]["p50"] / emu["metrics"]["predicted"]["tpot_ms"])
    assert rows["tp2"]["band"] == [0.9, 1.1] and rows["full"]["band"] == [0.75, 1.25]
    counted = summary(list(rows.values()))
    assert counted["1-2 ranks"]["rows"] == 3
    assert sum(v["rows"] for v in counted.values()) == len(RUNS)


def test_a_comm_file_with_in_step_entries_prices_tensor_all_reduces_with_them(tmp_path):
    from gptbench import stepcomm

    def entry(op, us):
        return {"op": op, "group_size": 2, "concurrent_groups": 1, "bytes": 1024,
                "latency_us": us, "iterations": 20, "world_size": 2}

    path = tmp_path / "comm.json"
    base = {"schema": "gptbench.comm/1", "backend": "gloo", "measured_at": "now",
            "entries": [entry("all_reduce", 100.0), entry("p2p", 50.0)]}
    path.write_text(json.dumps(base))
    lookup, _ = predict.latency_from(comm_file=str(path))
    assert lookup("all_reduce", 2, 1024) == pytest.approx(100.0)
    path.write_text(json.dumps({**base, "entries": base["entries"] + [entry(stepcomm.OP, 900.0)]}))
    lookup, source = predict.latency_from(comm_file=str(path))
    assert lookup("all_reduce", 2, 1024) == pytest.approx(900.0) and "in_step" in source
    assert lookup("p2p", 2, 1024) == pytest.approx(50.0)
