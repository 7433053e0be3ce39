"""The time breakdown (compute / communication / waiting) on hand-made call logs, then on
real multi-process runs: it sums to 1 on every rank, the pipeline bubble is the waiting
share beside its theory, the collectives counted per decode step are the sharding
model's, the shards are DeepSpeed's, and every record carries `predicted`."""

import pytest

from gptbench import sharding
from gptbench.plan import model_dims
from gptbench.trackers.breakdown import split_calls, time_breakdown
from paths import TINY_CPU as CONFIG
from sweeps import run_sweeps


def call(op, kind, group, post, start=None, end=None, nbytes=4):
    start = post if start is None else start
    return [op, kind, list(group), nbytes, post, start, end]


def test_a_collective_waits_for_the_last_peer():
    # Rank 0 enters the all-reduce at 1.0, rank 1 at 1.3; both leave at 1.4.
    logs = {0: [call("all_reduce", "collective", (0, 1), 1.0, end=1.4)],
            1: [call("all_reduce", "collective", (0, 1), 1.3, end=1.4)]}
    split = split_calls(logs)
    (s0,), (s1,) = split["calls"][0], split["calls"][1]
    assert s0[1] == pytest.approx(0.3) and s0[2] == pytest.approx(0.1)  # waited, then 0.1
    assert s1[1] == 0.0 and s1[2] == pytest.approx(0.1)
    assert split["unmatched"] == {0: 0, 1: 0}
    assert s0[3:] == ("all_reduce", 1.0)  # op and when it was issued


def test_the_kth_call_on_a_group_matches_the_kth_on_its_peers():
    logs = {0: [call("all_reduce", "collective", (0, 1), 1.0, end=1.1),
                call("all_reduce", "collective", (0, 1), 2.0, end=2.6)],
            1: [call("all_reduce", "collective", (0, 1), 1.05, end=1.1),
                call("all_reduce", "collective", (0, 1), 2.5, end=2.6)]}
    waits = [s[1] for s in split_calls(logs)["calls"][0]]
    assert waits == [pytest.approx(0.05), pytest.approx(0.5)]


def test_a_receive_waits_for_its_sender_and_non_blocking_waits_count():
    # Stage 1 blocks in recv from 0.0; stage 0 sends at 0.8 (after computing).
    logs = {0: [call("send", "send", (0, 1), 0.8, end=0.81)],
            1: [call("recv", "recv", (0, 1), 0.0, end=0.82),
                # an irecv posted at 1.0, waited on from 1.5 to 1.6, its isend at 1.55
                call("irecv", "recv", (2, 1), 1.0, start=1.5, end=1.6)],
            2: [call("isend", "send", (2, 1), 1.55, start=None, end=None)]}
    split = split_calls(logs)
    recv, irecv = split["calls"][1]
    assert recv[1] == pytest.approx(0.8) and recv[2] == pytest.approx(0.02)
    assert irecv[1] == pytest.approx(0.05) and irecv[2] == pytest.approx(0.05)
    assert split["calls"][2] == [(1.55, 0.0, 0.0, "isend", 1.55)]  # never waited on: no time


def test_an_unmatched_call_counts_as_communication():
    logs = {0: [call("all_reduce", "collective", (0, 1), 1.0, end=1.5)], 1: []}
    split = split_calls(logs)
    assert split["calls"][0][0][1:3] == (0.0, pytest.approx(0.5))
    assert split["unmatched"][0] == 1


def profile(calls, marks, host="h"):
    return {"host": host, "clock_ref_s": marks[0], "marks_s": marks, "calls": calls}


def test_fractions_sum_to_one_and_phases_split():
    # Batch 0..4 s: prefill 0..1, two decode steps 1..2.5 and 2.5..4.
    marks = [0.0, 1.0, 2.5, 4.0]
    p0 = [call("all_reduce", "collective", (0, 1), 0.5, end=0.7),
          call("all_reduce", "collective", (0, 1), 1.2, end=2.0),
          call("all_reduce", "collective", (0, 1), 3.0, end=3.2)]
    p1 = [call("all_reduce", "collective", (0, 1), 0.6, end=0.7),
          call("all_reduce", "collective", (0, 1), 1.9, end=2.0),
          call("all_reduce", "collective", (0, 1), 3.1, end=3.2)]
    block, phases = time_breakdown({0: profile(p0, marks), 1: profile(p1, marks)})
    r0 = block["per_rank"][0]
    assert r0["waiting"] == pytest.approx((0.1 + 0.7 + 0.1) / 4)
    assert r0["communication"] == pytest.approx((0.1 + 0.1 + 0.1) / 4)
    assert r0["compute"] + r0["communication"] + r0["waiting"] == pytest.approx(1.0)
    assert phases[0]["decode"]["waiting_s"] == pytest.approx(0.8)
    assert phases[0]["decode_step_median"]["compute_s"] == pytest.approx((1.5 - 0.8 + 1.5 - 0.2) / 2)
    assert r0["decode_step_calls"] == {"all_reduce": 1.0}
    assert "one host" in block["source"]


def test_clocks_of_two_hosts_are_aligned_at_the_barrier():
    # Host b's clock runs 100 s ahead; both ranks left the barrier together.
    a = profile([call("all_reduce", "collective", (0, 1), 1.0, end=1.4)], [0.0, 0.5, 2.0], "a")
    b = profile([call("all_reduce", "collective", (0, 1), 101.3, end=101.4)],
                [100.0, 100.5, 102.0], "b")
    block, _ = time_breakdown({0: a, 1: b})
    assert block["per_rank"][0]["waiting"] == pytest.approx(0.3 / 2)
    assert "2 hosts" in block["source"]


# ---- real runs --------------------------------------------------------------------------

RUNS = {  # id: (ranks, overrides)
    "dp2": (2, {"strategy": "dp"}),
    "tp2": (2, {"strategy": "tp", "topology.tp": 2}),
    "pp2": (2, {"strategy": "pp", "topology.micro_batches": 2}),  # in flight (the default)
    "pp2-flush": (2, {"strategy": "pp", "topology.micro_batches": 2,
                      "topology.pipeline_schedule": "flush"}),
    "full": (4, {"strategy": "full", "topology.tp": 2, "topology.pp": 2}),
}
OUTPUT_LEN = 6
COMMON = [f"workload.output_len={OUTPUT_LEN}", "workload.num_samples=4", "workload.iterations=1",
          "workload.warmup=0", "parity.samples=4", "parity.tokens=4",
          "engine.comm_timeout_s=60", "timeout_s=240"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_sweeps(tmp_path_factory.mktemp("breakdown"), CONFIG, RUNS, COMMON, timeout_s=600)


def layout_of(record):
    t, w = record["topology"], record["workload"]
    return sharding.layout(model_dims("tiny"), t["dp"], t["tp"], t["pp"], t["micro_batches"],
                           w["batch_size"], w["input_len"], w["output_len"], 4,
                           t.get("pipeline_schedule") or "flush", partition_method="uniform")


@pytest.mark.parametrize("run_id", list(RUNS))
def test_breakdown_sums_to_one_on_every_rank(records, run_id):
    r = records[run_id]
    assert r is not None and r["status"] == "ok", r and r["error"]
    b = r["metrics"]["time_breakdown"]
    assert len(b["per_rank"]) == r["topology"]["world_size"]
    for f in b["per_rank"]:
        assert all(0 <= f[k] <= 1 for k in ("compute", "communication", "waiting")), f
        assert f["compute"] + f["communication"] + f["waiting"] == pytest.approx(1, abs=0.02)
        assert f["compute"] > 0.05, f  # every rank computes something
    assert b["unmatched_calls"] == 0
    assert "separate profiled batch" in b["source"] and "upper bound" in b["source"]


def test_data_parallel_neither_communicates_nor_waits(records):
    for f in records["dp2"]["metrics"]["time_breakdown"]["per_rank"]:
        assert f["communication"] == 0 and f["waiting"] == 0
        assert f["decode_step_calls"] == {}


def test_tensor_parallel_communicates(records):
    b = records["tp2"]["metrics"]["time_breakdown"]
    assert b["communication"] > 0.05
    assert records["tp2"]["metrics"]["comm_fraction"] == b["communication"]


@pytest.mark.parametrize("run_id,schedule,theory", [
    ("pp2-flush", "flush", 1 / 3),                        # (p-1)/(m+p-1)
    ("pp2", "in_flight", 1 / (OUTPUT_LEN * 2 + 1)),       # (p-1)/(N*m+p-1)
])
def test_bubble_is_the_waiting_share_beside_its_theory(records, run_id, schedule, theory):
    m = records[run_id]["metrics"]
    bubble, b = m["bubble_fraction"], m["time_breakdown"]
    assert bubble["measured"] == b["waiting"] > 0
    assert bubble["schedule"] == schedule and bubble["theory"] == pytest.approx(theory)
    # No overlap: communication and the bubble share one whole.
    assert m["comm_fraction"] + bubble["measured"] <= 1


def expected_calls_per_rank(record):
    """Per global rank, {op: calls per decode step} from the sharding model (2 stages)."""
    lay, t = layout_of(record), record["topology"]
    in_flight = t.get("pipeline_schedule") == "in_flight"
    steps = OUTPUT_LEN - 1
    out = {}
    for rank in range(t["world_size"]):
        stage, last = rank // (t["dp"] * t["tp"]), t["pp"] - 1
        calls = {}

        def add(op, n, calls=calls):
            calls[op] = calls.get(op, 0) + n

        for c in lay.collectives():
            if c.where == "tick" and c.stage == stage:
                add("all_reduce", c.per_step)
            elif c.where == "hop":  # flush: blocking send; in flight: isend
                add(("isend" if in_flight else "send") if stage < last else "recv", c.per_step)
            elif c.where == "back":  # the last step's tokens are not sent back
                add("isend" if stage == last else "recv",
                    c.per_step * ((steps - 1) / steps if stage == last else 1))
            elif c.where == "step":
                add(c.op, c.per_step)
        if in_flight:  # the batch's tokens, broadcast once at its end
            add("broadcast", 1 / steps)
        out[rank] = calls
    return out


@pytest.mark.parametrize("run_id", ["tp2", "pp2", "pp2-flush", "full"])
def test_collectives_per_step_are_the_sharding_models(records, run_id):
    r = records[run_id]
    expected = expected_calls_per_rank(r)
    for rank, f in enumerate(r["metrics"]["time_breakdown"]["per_rank"]):
        assert f["decode_step_calls"] == pytest.approx(expected[rank]), rank


@pytest.mark.parametrize("run_id", list(RUNS))
def test_shards_and_model_memory_are_the_sharding_models(records, run_id):
    r = records[run_id]
    mem = r["metrics"]["model_memory_bytes"]
    assert [w // 4 for w in mem["weights"]] == r["topology"]["params_per_rank"]
    assert mem["per_rank"] == [w + k for w, k in zip(mem["weights"], mem["kv"])]
    assert r["metrics"]["roofline"]["bytes_per_decode_step"] == pytest.approx(
        layout_of(r).decode_step_bytes(layout_of(r).slowest()))


@pytest.mark.parametrize("run_id", list(RUNS))
def test_every_record_carries_a_prediction_with_its_inputs(records, run_id):
    p = records[run_id]["metrics"]["predicted"]
    assert p["tpot_ms"] > 0 and len(p["compute_ms_per_step"]) == records[run_id]["topology"]["pp"]
    assert "profiled batch" in p["compute_source"] and "probed" in p["latency_source"]
    assert p["measured_over_predicted"] == pytest.approx(p["measured_tpot_ms_p50"] / p["tpot_ms"])
    assert p["unknown_latency"] is None
    if run_id != "dp2":
        assert p["latencies"] and all(c["latency_us"] > 0 for c in p["collectives"])
        # in flight, the hops may hide behind the other micro-batches' compute
        assert p["comm_ms_per_token"] > 0 or p["schedule"] == "in_flight"


def test_a_compiled_rows_step_is_its_own_whole_the_eager_collectives_not_subtracted():
    """The eager profiled batch's communication (synced, unfused) says nothing about the
    compiled program's: its step is taken whole, and no latency is added on top of it."""
    from gptbench.figures import rank_step_compute_s

    phase = {"decode_step_median": {"compute_s": 0.010, "communication_s": 0.004,
                                    "waiting_s": 0.001}}
    assert rank_step_compute_s({"decode_steps": 3}, phase) == 0.010
    compiled = {"decode_steps": 3, "compiled_marks_s": [0.0, 0.5, 0.508, 0.516, 0.524]}
    assert rank_step_compute_s(compiled, phase) == pytest.approx(0.008)


def test_one_segment_of_decode_steps_is_averaged():
    # The in-flight schedule marks only where the decode starts (its hook) and ends.
    calls = [call("recv", "recv", (1, 0), 1.0, end=1.5), call("recv", "recv", (1, 0), 2.0, end=2.1)]
    sender = [call("isend", "send", (1, 0), 1.4, start=3.0, end=3.0),
              call("isend", "send", (1, 0), 2.05, start=3.0, end=3.0)]
    prof = {0: {**profile(calls, [0.0, 0.5, 4.5]), "decode_steps": 4},
            1: {**profile(sender, [0.0, 0.5, 4.5]), "decode_steps": 4}}
    _, phases = time_breakdown(prof)
    median = phases[0]["decode_step_median"]
    assert median["wall_s"] == pytest.approx(1.0)  # 4 s over 4 steps
    assert median["waiting_s"] == pytest.approx((0.4 + 0.05) / 4)
    assert phases[1]["decode_step_calls"] == {"isend": 0.5}  # counted where posted


def device_call(op, kind, group, post, kernel_s):
    """A call as the CUDA path logs it: placed at its post, lasting its NCCL kernel."""
    return [op, kind, list(group), 4, post, post, post + kernel_s, kernel_s]


def test_nccl_kernel_times_split_by_the_groups_shortest_kernel():
    # Rank 0's kernel spun 30 us waiting for rank 1, whose kernel (arriving last) took 7 us:
    # the transfer is 7 us on both, rank 0 waited 30 us. Host posts do not matter here.
    logs = {0: [device_call("all_reduce", "collective", (0, 1), 1.000, 37e-6)],
            1: [device_call("all_reduce", "collective", (0, 1), 0.999, 7e-6)]}
    split = split_calls(logs)
    (s0,), (s1,) = split["calls"][0], split["calls"][1]
    assert s0[1] == pytest.approx(30e-6) and s0[2] == pytest.approx(7e-6)
    assert s1[1] == pytest.approx(0.0) and s1[2] == pytest.approx(7e-6)
    assert split["unmatched"] == {0: 0, 1: 0}
    block, _ = time_breakdown({r: profile(c, [0.9, 1.0, 1.1]) for r, c in logs.items()})
    assert "NCCL kernel" in block["source"] and "syncs around it" not in block["source"]


def test_a_compiled_tp_rows_prediction_adds_no_latency_to_its_compiled_step():
    """Compiled tp=2: the profiled batch ran eagerly (its all-reduces tracked); the compiled
    batch's step (8 ms, collectives inside) is the prediction's compute, and no all-reduce
    latency is added on top (the eager batch's would count them twice)."""
    from gptbench import sharding
    from gptbench.figures import predicted
    from gptbench.roofline import ModelDims
    from gptbench.topology import Grid

    dims = ModelDims.of({"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 16,
                         "n_positions": 32})
    lay = sharding.layout(dims, 1, 2, 1, 1, 1, 4, 4, 4)
    grid = Grid(2, 1, 2, 1)
    marks = [0.0, 0.1, 0.2, 0.3, 0.4]  # eager: prefill, then 3 decode steps of 100 ms
    calls = [call("all_reduce", "collective", (0, 1), t, end=t + 0.04) for t in (0.15, 0.25, 0.35)]
    ranks = [{"rank": r, "profile": {**profile(calls, marks), "decode_steps": 3,
                                     "compiled_marks_s": [1.0, 1.1, 1.108, 1.116, 1.124],
                                     "latency_s": {"all_reduce:32": 0.001}}}
             for r in (0, 1)]
    out, why = predicted(lay, grid, ranks, {"tpot_ms": {"p50": 8.0}})
    assert why is None
    assert out["compute_ms_per_step"] == [pytest.approx(8.0)]
    assert out["tpot_ms"] == pytest.approx(8.0)  # the compiled step, nothing added
    assert "none added" in out["latency_source"]
    assert "whole step time" in out["compute_source"]


def test_without_nccl_kernel_times_the_fractions_are_null_and_say_why():
    """TORCH_NCCL_ENABLE_TIMING off: the calls have no kernel time; zero communication
    would be a made-up number, so the fractions are null and the source says why."""
    logs = {r: [call("all_reduce", "collective", (0, 1), 1.0, end=1.0)] for r in (0, 1)}
    profiles = {r: {**profile(c, [0.9, 1.0, 1.1]),
                    "comm_timing_error": "RuntimeError: getDuration only works if timing was enabled"}
                for r, c in logs.items()}
    block, _ = time_breakdown(profiles)
    assert block["communication"] is None and block["compute"] is None
    assert "NCCL kernel times unavailable: RuntimeError: getDuration" in block["source"]
