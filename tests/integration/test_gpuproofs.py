"""The single-GPU proofs `make gpu-check` runs (gptbench/gpuproofs.py): the registry, and
each proof's CPU variant or its stated skip. The CUDA branches are unverified here."""
import json

import pytest
import torch

from gptbench import gpuproofs
from gptbench.errors import UserError

CPU = torch.device("cpu")


def test_every_proof_returns_name_ok_details_and_cuda_only_ones_say_why_not():
    results = gpuproofs.run_proofs(CPU, 60, ["nccl_one_rank_cuda_graph",
                                             "in_flight_event_timing"])
    assert [r["name"] for r in results] == ["nccl_one_rank_cuda_graph", "in_flight_event_timing"]
    assert all({"name", "ok", "details"} <= set(r) for r in results)
    nccl, timing = results
    assert nccl["ok"] is None and "needs CUDA" in nccl["details"]["skipped"]
    assert timing["ok"] is True
    json.dumps(results)  # what gpu-check writes


def test_unknown_names_are_bad_input_and_a_spent_budget_skips():
    with pytest.raises(UserError, match="unknown proof 'nope'"):
        gpuproofs.run_proofs(CPU, 60, ["nope"])
    (result,) = gpuproofs.run_proofs(CPU, 1, ["in_flight_event_timing"])
    assert result["ok"] is None and "budget is spent" in result["details"]["skipped"]


def test_a_proof_that_raises_is_failed_and_the_next_still_runs(monkeypatch):
    def broken(device, budget_s):
        raise RuntimeError("NCCL error: unhandled cuda error")

    monkeypatch.setitem(gpuproofs.PROOFS, "broken", (broken, 0.5))
    first, second = gpuproofs.run_proofs(CPU, 60, ["broken", "in_flight_event_timing"])
    assert first["ok"] is False and "unhandled cuda error" in first["details"]["error"]
    assert second["ok"] is True


def test_two_stages_with_ordered_hand_offs_give_the_one_stream_tokens_and_their_times():
    """The in-flight schedule's stand-in on the host clock: every micro-batch's token times
    come out, one per step, increasing, and the tokens equal the in-order computation."""
    out = gpuproofs.two_stage_schedule(CPU, d=32, mb=3, m=2, steps=5)
    assert out["tokens_match"] is True
    assert [len(row) for row in out["token_s"]] == [5, 5]
    assert all(b > a > 0 for row in out["token_s"] for a, b in zip(row, row[1:]))
    # on the host the work runs when issued: the last token comes before issuing ends
    assert max(row[-1] for row in out["token_s"]) <= out["host_issue_s"]
    proof = gpuproofs.in_flight_event_timing(CPU, 30, steps=4)
    assert proof["ok"] is True and proof["details"]["host_ran_ahead"] is None


def test_processes_compiling_at_once_are_compared_with_the_watchdog():
    """Two processes (dynamo only, to stay short here) compile the tiny model at once; their
    spread is measured and compared with what `comm_timeout_s: auto` would choose."""
    result = gpuproofs.four_ranks_compiling(CPU, 300, processes=2, backend="eager")
    d = result["details"]
    assert d["finished"] == 2 and d["errors"] == [] and len(d["compile_wall_s"]) == 2
    assert d["spread_s"] == pytest.approx(max(d["compile_wall_s"]) - min(d["compile_wall_s"]),
                                          abs=1.0)
    assert d["watchdog_s"] >= 120 and "2 rank(s) compiling at once" in d["watchdog_reason"]
    assert result["ok"] is (d["spread_s"] < d["watchdog_s"])
