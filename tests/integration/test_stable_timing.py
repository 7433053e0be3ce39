"""Stable timing and the figures that come with it: timed passes continue until both
workload.iterations and workload.min_duration_s hold, decided by all ranks together; the
record carries 95 % intervals, per-batch figures, a validity verdict and energy (null on CPU).

The continuation is checked on a real 2-process gloo group where the ranks disagree, then in
real 2-rank and 1-rank runs of the tiny model (deepspeed_configs/tiny-cpu-timed.yaml).
"""
import multiprocessing
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from gptbench import results, scaling
from gptbench.measure import ContinueRule
from gptbench.report.render import render_report
from paths import CONFIGS, ROOT

CONFIG = os.path.join(CONFIGS, "tiny-cpu-timed.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
CPU = torch.device("cpu")


def timing(wall_s: float, last_pass_s: float = 0.1):
    return SimpleNamespace(timed_wall_s=wall_s, iteration_wall_s=[last_pass_s])


def test_one_rank_continues_until_the_duration_then_stops():
    rule = ContinueRule(1.0, deadline=float("inf"), device=CPU)
    assert rule(timing(0.4)) is True and rule.stopped_by == "iterations"
    assert rule(timing(1.2)) is False and rule.stopped_by == "min_duration"


def test_a_duration_already_met_stops_at_the_iterations():
    rule = ContinueRule(1.0, deadline=float("inf"), device=CPU)
    assert rule(timing(3.0)) is False and rule.stopped_by == "iterations"


def test_no_pass_is_added_that_would_end_after_the_deadline():
    now = time.time()
    rule = ContinueRule(100.0, deadline=now + 5.0, device=CPU, clock=lambda: now)
    assert rule(timing(1.0, last_pass_s=1.0)) is True
    assert rule(timing(2.0, last_pass_s=6.0)) is False and rule.stopped_by == "timeout_bound"


def _rank(rank: int, port: int, walls: list, lates: list, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    now = time.time()
    answers = []
    for wall, late in zip(walls[rank], lates[rank]):
        rule = ContinueRule(1.0, deadline=now + (0.0 if late else 1e6), device=CPU,
                            clock=lambda: now)
        answers.append((rule(timing(wall)), rule.stopped_by))
    torch.distributed.destroy_process_group()
    out.put((rank, answers))


def test_ranks_that_disagree_decide_together_over_a_real_group():
    from gptbench.worker import _free_port

    # pass 1: rank 0 has its duration, rank 1 not -> both go on;
    # pass 2: both have it -> both stop; pass 3: rank 1 short but rank 0 at its deadline -> both stop
    walls = [[1.5, 1.5, 0.2], [0.5, 1.5, 0.2]]
    lates = [[False, False, True], [False, False, False]]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, walls, lates, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [a for a, _ in got[0]] == [a for a, _ in got[1]] == [True, False, False]
    assert got[0][2][1] == got[1][2][1] == "timeout_bound"


# ---- real runs ------------------------------------------------------------------------------

def _run(out, ranks: int) -> dict:
    cmd = [sys.executable, "-m", "gptbench", "run", "--config", CONFIG,
           "--set", f"topology.world_size={ranks}", "--set", f"output_dir={out}",
           "--set", "engine.comm_timeout_s=60"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = f"{ranks}r-dp-tp1-pp1"
    return results.read_run(os.path.join(out, "runs", f"{run_id}.json"))  # FIELD_TYPES hold


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("timed"))
    return out, _run(out, 2), _run(out, 1)


def test_timed_passes_continue_together_until_both_minimums_hold(runs):
    _, two, _ = runs
    passes = two["metrics"]["timed_passes"]
    assert passes["min_iterations"] == 2 and passes["min_duration_s"] == 1.5
    assert passes["wall_s"] >= 1.5 and passes["count"] > 2  # the tiny model needs more than 2
    assert passes["stopped_by"] == "min_duration"
    assert passes["per_rank_count"] == [passes["count"]] * 2  # no rank ran a pass alone
    assert len(two["metrics"]["throughput_iterations"]) == passes["count"]
    w = two["workload"]
    assert two["metrics"]["generated_tokens"] == passes["count"] * 2 * w["num_samples"] * w["output_len"]


def test_the_record_carries_intervals_and_per_batch_figures(runs):
    _, two, _ = runs
    m = two["metrics"]
    per_pass = two["workload"]["num_samples"] // two["workload"]["batch_size"]
    batches = m["batches"]
    assert len(batches["tokens"]) == len(batches["wall_s"]) == m["timed_passes"]["count"] * per_pass
    assert set(batches["tokens"]) == {2 * two["workload"]["batch_size"] * two["workload"]["output_len"]}
    ci = m["intervals"]
    assert ci["confidence"] == 0.95 and ci["seed"] == 0 and "bootstrap" in ci["method"]
    assert ci["batches"] == len(batches["tokens"])
    low, high = ci["throughput_tokens_per_s"]
    assert low < m["throughput_tokens_per_s"] < high
    for key, name in (("ttft_ms", "ttft_ms_p50"), ("tpot_ms", "tpot_ms_p50")):
        low, high = ci[name]
        assert low <= m[key]["p50"] <= high and low < high


def test_validity_and_energy_null_on_cpu(runs):
    _, two, _ = runs
    validity = two["metrics"]["validity"]
    assert validity["verdict"] in ("valid", "invalid")
    assert (validity["verdict"] == "invalid") == bool(validity["reasons"])
    checks = validity["checks"]
    assert checks["timed_tokens"]["generated"] >= checks["timed_tokens"]["asked"]
    assert checks["graphs_in_timed_passes"] == 0  # engine.compile is off on CPU
    assert checks["throughput_cv_pct"]["max"] == 10.0
    load = checks["load"][0]
    assert load["ranks"] == 2 and load["cpu_count"] == os.cpu_count()
    if load["load_avg_1m_max"] is not None and load["load_avg_1m_max"] > load["cpu_count"]:
        assert any("load average" in r for r in validity["reasons"])
    assert two["metrics"]["energy"] is None
    assert "uses no GPU (device: cpu)" in two["null_reasons"]["metrics.energy"]


def test_speedup_interval_from_the_two_runs_and_the_report_shows_it(runs):
    out, _, _ = runs
    derived = {r["run_id"]: r for r in scaling.derive(results.load_runs(out)[0])}
    two, one = derived["2r-dp-tp1-pp1"], derived["1r-dp-tp1-pp1"]
    assert one["metrics"]["intervals"]["speedup"] == [1.0, 1.0]  # the baseline against itself
    low, high = two["metrics"]["intervals"]["speedup"]
    assert low < two["metrics"]["speedup"] < high
    eff = two["metrics"]["intervals"]["parallel_efficiency"]
    assert eff == pytest.approx([low / 2, high / 2])
    render_report(out)
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    row = next(line for line in md.splitlines() if line.startswith("| 2r-dp-tp1-pp1 | pure_data"))
    assert row.count(" ± ") >= 3  # throughput, speedup, efficiency
