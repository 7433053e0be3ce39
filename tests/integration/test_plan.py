"""`gptbench plan`: hand computation for GPT-2 XL fp16 on RTX 3080s, and agreement with
`gptbench run` (the same grids, micro-batch rule and vocabulary)."""
import itertools
import math
import random
import subprocess
import sys

import pytest

from gptbench import sharding
from gptbench.config import STRATEGIES, config_from_dict
from gptbench.errors import NotApplicable, UserError
from gptbench.plan import format_plan, model_dims, plan
from gptbench.runplan import resolve

GiB = 2 ** 30
BW_3080 = 760e9
D = 1600
BLOCK = 12 * D * D + 13 * D         # 30,740,800
WEIGHTS = 3_115_222_400             # 1,557,611,200 params * 2 bytes
KV_PER_TOKEN = 307_200              # 2 * 48 * 1600 * 2 bytes
MEAN_STEP_KV = 4 * 288 * KV_PER_TOKEN  # batch 4, mean decode context 256 + 64/2
READ_ONE_GPU = 2 * (48 * BLOCK + 2 * D + 50257 * D + 8 * D)  # blocks, ln_f, lm_head, 8 rows


def ok(rows):
    return [r for r in rows if r.status == "ok"]


def by_grid(rows):
    return {(r.strategy, r.dp, r.tp, r.pp, r.schedule): r for r in ok(rows)}


def test_one_gpu_data_parallel_fits():
    (row,) = plan("gpt2-xl", 1, "rtx3080", 4, 256, 64, "float16")
    assert (row.strategy, row.dp, row.tp, row.pp, row.schedule) == ("pure_data_parallel", 1, 1, 1, "none")
    assert row.weight_bytes_per_rank == WEIGHTS  # ~3.1 GB
    assert row.kv_cache_bytes_per_rank == 4 * 320 * KV_PER_TOKEN  # full cache at 256 + 64
    assert row.total_bytes_per_rank == WEIGHTS + 393_216_000
    assert row.headroom_bytes == 10 * GiB - WEIGHTS - 393_216_000
    assert row.verdict == "fits"
    assert row.bytes_per_decode_step == READ_ONE_GPU + MEAN_STEP_KV
    assert row.tpot_ms_bound == pytest.approx((READ_ONE_GPU + MEAN_STEP_KV) / BW_3080 * 1e3)
    assert row.tokens_per_s_bound == pytest.approx(877, rel=0.01)
    assert row.speedup_bound == 1.0
    assert row.host_bytes_per_rank == WEIGHTS  # the whole model, no shard made


def test_tensor_parallel_bound_counts_gathered_embedding_rows():
    tp = by_grid(plan("gpt2-xl", 2, "rtx3080"))["tensor_data_hybrid", 1, 2, 1, "none"]
    assert tp.bytes_per_decode_step == pytest.approx(1_763_373_952)  # test_sharding's hand sum
    assert tp.speedup_bound == pytest.approx(1.9655, abs=1e-4)
    assert tp.host_bytes_per_rank == WEIGHTS + tp.weight_bytes_per_rank  # whole + new shard


def test_pipeline_flush_and_in_flight_side_by_side():
    rows = by_grid(plan("gpt2-xl", 2, "rtx3080"))
    flush = rows["pipeline_data_hybrid", 1, 1, 2, "flush"]
    in_flight = rows["pipeline_data_hybrid", 1, 1, 2, "in_flight"]
    assert flush.micro_batches == in_flight.micro_batches == 2
    assert flush.total_bytes_per_rank == in_flight.total_bytes_per_rank  # m caches of B/m
    stage0 = 2 * 2 * ((50257 + 1024) * 0 + 24 * BLOCK + 4 * D) + MEAN_STEP_KV / 2  # 2 ticks
    stage1 = 2 * 2 * (24 * BLOCK + 2 * D + 50257 * D) + MEAN_STEP_KV / 2
    t0, t1 = stage0 / 2 / BW_3080, stage1 / 2 / BW_3080
    assert flush.tpot_ms_bound == pytest.approx(1e3 * (t0 + t1 + max(t0, t1)))
    assert in_flight.tpot_ms_bound == pytest.approx(1e3 * 2 * max(t0, t1))
    assert flush.speedup_bound < 1.0 < in_flight.speedup_bound * 1.01


def test_in_flight_needs_as_many_micro_batches_as_stages():
    rows = plan("gpt2-xl", 2, "h100", batch_size=1)
    refused = [r for r in rows if r.status == "refused"]
    assert [(r.strategy, r.schedule) for r in refused] == [("pipeline_data_hybrid", "in_flight")]
    assert "micro_batches >= pp" in refused[0].reason
    assert "not possible: pipeline_data_hybrid 1x1x2 in_flight" in format_plan(rows)


def test_three_gpus_list_tensor_and_pipeline_of_three():
    grids = {(r.strategy, r.dp, r.tp, r.pp) for r in ok(plan("gpt2-xl", 3, "rtx3080", 6))}
    assert grids == {("pure_data_parallel", 3, 1, 1), ("tensor_data_hybrid", 1, 3, 1),
                     ("pipeline_data_hybrid", 1, 1, 3)}


def test_four_gpus_grids():
    grids = {(r.strategy, r.dp, r.tp, r.pp) for r in ok(plan("gpt2-xl", 4, "h100"))}
    assert grids == {("pure_data_parallel", 4, 1, 1), ("tensor_data_hybrid", 2, 2, 1),
                     ("tensor_data_hybrid", 1, 4, 1), ("pipeline_data_hybrid", 2, 1, 2),
                     ("pipeline_data_hybrid", 1, 1, 4), ("full_model_parallel", 1, 2, 2)}


def run_accepts(gpus: int, batch: int, m, schedule: str, model="tiny"):
    """{(strategy, tp, pp, m)} that runplan.resolve accepts, over every explicit degree."""
    out = set()
    degrees = [None] + [k for k in range(1, gpus + 1) if gpus % k == 0]
    for strategy, tp, pp in itertools.product(STRATEGIES, degrees, degrees):
        cfg = config_from_dict({
            "strategy": strategy, "model": {"name": model, "weights": "random", "preset": model},
            "topology": {"tp": tp, "pp": pp, "micro_batches": m, "pipeline_schedule": schedule},
            "workload": {"dtype": "float32", "batch_size": batch, "num_samples": batch,
                         "input_len": 8, "output_len": 4},
            "parity": {"enabled": False}, "engine": {"device": "cpu"}})
        try:
            p = resolve(cfg, gpus)
        except (UserError, NotApplicable):
            continue
        out.add((strategy, p.grid.tp, p.grid.pp, p.micro_batches))
    return out


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 6])
def test_plan_lists_exactly_what_run_accepts(gpus):
    for batch, m in itertools.product((1, 2, 3, 4, 6), (None, 1, 2, 3, 4)):
        try:
            rows = plan("tiny", gpus, "h100", batch, 8, 4, "float32", micro_batches=m)
        except UserError:
            rows = []
        for schedule in ("flush", "in_flight"):
            planned = {(r.strategy, r.tp, r.pp, r.micro_batches) for r in ok(rows)
                       if r.schedule in (schedule, "none")}
            assert planned == run_accepts(gpus, batch, m, schedule), (gpus, batch, m, schedule)


def test_plan_and_run_refuse_an_indivisible_batch_alike():
    rows = plan("gpt2-xl", 2, "rtx3080", batch_size=3)
    refused = {r.schedule: r.reason for r in rows if r.strategy == "pipeline_data_hybrid"}
    assert refused["flush"] == "workload.batch_size=3 is not divisible by topology.micro_batches=2"


def test_one_dtype_vocabulary():
    for alias in ("fp16", "half", "bf16", "auto"):
        with pytest.raises(UserError, match="float16, bfloat16, float32"):
            plan("gpt2-xl", 1, "h100", dtype=alias)
    assert ok(plan("gpt2-xl", 1, "h100", dtype="bfloat16"))


def test_a_batch_too_big_says_the_largest_that_fits():
    rows = by_grid(plan("gpt2-xl", 4, "h100", batch_size=4096))
    dp = rows["pure_data_parallel", 4, 1, 1, "none"]
    per_sequence = 320 * KV_PER_TOKEN
    assert dp.verdict == "does not fit"
    assert dp.max_batch_size == math.floor((80 * GiB - WEIGHTS) / per_sequence)  # 842
    assert WEIGHTS + dp.max_batch_size * per_sequence <= 80 * GiB
    assert WEIGHTS + (dp.max_batch_size + 1) * per_sequence > 80 * GiB
    pp = rows["pipeline_data_hybrid", 2, 1, 2, "flush"]
    assert pp.max_batch_size % 2 == 0  # the batch must divide by m = pp
    text = format_plan(list(rows.values()))
    assert "batch <= 842 fits" in text and "-" not in text.split("does not fit")[1][:3]


def test_weights_alone_too_big():
    (row,) = plan("gpt2-xl", 1, None, dtype="float32", gpu_memory_gib=4, gpu_bandwidth_gbps=300)
    assert row.max_batch_size == 0 and "does not fit at any batch" in format_plan([row])


def test_an_unlisted_card_by_its_figures():
    rows = plan("gpt2-xl", 2, "Tesla V100-SXM2-32GB", gpu_memory_gib=32, gpu_bandwidth_gbps=900)
    dp = by_grid(rows)["pure_data_parallel", 2, 1, 1, "none"]
    assert dp.device_memory_bytes == 32 * GiB
    assert dp.tokens_per_s_bound == pytest.approx(2 * 4 * 900e9 / (READ_ONE_GPU + MEAN_STEP_KV))
    with pytest.raises(UserError, match="--gpu-memory-gib and --gpu-bandwidth-gbps"):
        plan("gpt2-xl", 1, "voodoo5")


def test_communication_latency_adds_to_the_bound():
    rows = by_grid(plan("gpt2-xl", 2, "rtx3080", comm_latency_us=10))
    tp = rows["tensor_data_hybrid", 1, 2, 1, "none"]
    assert tp.collectives_per_step == 97  # 2 per block + the lm_head's logits
    assert tp.tpot_ms_predicted == pytest.approx(tp.tpot_ms_bound + 97 * 0.010)
    dp = rows["pure_data_parallel", 2, 1, 1, "none"]
    assert dp.tpot_ms_predicted == pytest.approx(dp.tpot_ms_bound)  # nothing to send
    flush = rows["pipeline_data_hybrid", 1, 1, 2, "flush"]
    # the heavier stage 1 receives 2 messages on each of its 2 ticks; eval_batch's
    # barrier and the token broadcast once
    assert flush.tpot_ms_predicted == pytest.approx(flush.tpot_ms_bound + 0.010 * (2 * 2 + 2))
    assert "TPOT pred" in format_plan(list(rows.values()))
    assert "Communication not modelled" in format_plan(ok(plan("gpt2-xl", 2, "rtx3080")))


def test_comm_file_is_read(tmp_path):
    path = tmp_path / "comm.json"
    path.write_text('{"backend": "gloo", "measured_at": "now", "entries": ['
                    '{"op": "all_reduce", "group_size": 2, "concurrent_groups": 1, '
                    '"world_size": 2, "bytes": 4, "latency_us": 50},'
                    '{"op": "all_reduce", "group_size": 2, "concurrent_groups": 1, '
                    '"world_size": 2, "bytes": 4194304, "latency_us": 500}]}')
    tp = by_grid(plan("gpt2-xl", 2, "rtx3080", comm_file=str(path)))["tensor_data_hybrid", 1, 2, 1, "none"]
    assert tp.tpot_ms_predicted > tp.tpot_ms_bound + 97 * 0.050
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="diagnose --comm"):
        plan("gpt2-xl", 2, "rtx3080", comm_file=str(tmp_path / "bad.json"))


def test_bad_inputs():
    with pytest.raises(UserError, match="gpt2-xl"):
        plan("gpt5", 1, "h100")
    with pytest.raises(UserError, match="1024"):
        plan("gpt2-xl", 1, "h100", 1, 1000, 64)
    with pytest.raises(UserError, match="gpus"):
        plan("gpt2-xl", 0, "h100")
    with pytest.raises(UserError, match="partition_method"):
        plan("gpt2-xl", 2, "h100", partition_method="type:transformer")
    rows = plan("gpt2-xl", 2, "h100", 4, micro_batches=3)  # as run: no grid takes m=3 here
    assert rows and all(r.status == "refused" and "micro_batches=3" in r.reason for r in rows)


def test_cli_one_line_exit_2():
    for args in (["--dtype", "fp16"], ["--gpu", "voodoo5"], ["--gpus", "0"]):
        result = subprocess.run([sys.executable, "-m", "gptbench.cli", "plan", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_tiny_preset_dims():
    tiny = model_dims("tiny")
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.vocab_size) == (4, 5, 80, 512)
    assert model_dims("gpt2-xl").params == 1_557_611_200
    notes = [n for r in plan("tiny", 4, "h100", dtype="float32") for n in r.notes]
    assert any("heads 2/1/1/1" in n for n in notes)


def test_split_balanced_is_optimal():
    rng = random.Random(1)
    for _ in range(50):
        weights = [rng.randint(1, 20) for _ in range(rng.randint(2, 8))]
        parts = rng.randint(1, len(weights))
        bounds = sharding._split_balanced(weights, parts)
        heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(max(sum(weights[a:b]) for a, b in zip((0, *cuts), (*cuts, len(weights))))
                   for cuts in itertools.combinations(range(1, len(weights)), parts - 1))
        assert heaviest == best and bounds[0] == 0 and bounds[-1] == len(weights)


def test_uniform_split_and_stage_blocks():
    assert sharding._split_uniform(7, 3) == [0, 3, 5, 7]
    shares = sharding.rank_shares(model_dims("gpt2-xl"), tp=1, pp=2, partition_method="uniform")
    assert [s[0].layers for s in shares] == [(0, 25), (25, 50)]
    assert [s[0].blocks for s in shares] == [24, 24]


def test_format_plan_table():
    text = format_plan(plan("gpt2-xl", 2, "rtx3080"))
    lines = text.splitlines()
    assert "gpt2-xl float16 on 2 x GeForce RTX 3080" in lines[0]
    assert "760 GB/s" in lines[0]
    header = next(line for line in lines if line.startswith("strategy"))
    assert "tok/s <=" in header and "verdict" in header and "host/rank" in header
    for strategy in ("pure_data_parallel", "tensor_data_hybrid", "pipeline_data_hybrid"):
        assert any(line.startswith(strategy) for line in lines)
    assert "fits (" in text and "2.90 GiB" in text  # 3,115,222,400 B of fp16 weights
