"""`gptbench plan` numbers against hand computation for GPT-2 XL fp16 on RTX 3080s."""
import itertools
import random

import pytest

from gptbench.errors import UserError
from gptbench.plan import (_split_balanced, _split_uniform, format_plan, model_dims, plan,
                           stage_shares)

GiB = 2 ** 30
BW_3080 = 760e9
D = 1600
EMBED = (50257 + 1024) * D          # wte + wpe
BLOCK = 12 * D * D + 13 * D         # 30,740,800
WEIGHTS = 3_115_222_400             # 1,557,611,200 params * 2 bytes
KV_PER_TOKEN = 307_200              # 2 * 48 * 1600 * 2 bytes
MEAN_STEP_KV = 4 * 288 * KV_PER_TOKEN  # batch 4, mean decode context 256 + 64/2


def by_strategy(rows):
    return {(r.strategy, r.tp): r for r in rows}


def test_one_gpu_data_parallel_fits():
    (row,) = plan("gpt2-xl", 1, "rtx3080", 4, 256, 64, "float16")
    assert (row.strategy, row.dp, row.tp, row.pp) == ("pure_data_parallel", 1, 1, 1)
    assert row.weight_bytes_per_rank == WEIGHTS  # ~3.1 GB
    assert row.kv_cache_bytes_per_rank == 4 * 320 * KV_PER_TOKEN  # full cache at 256 + 64
    assert row.total_bytes_per_rank == WEIGHTS + 393_216_000
    assert row.device_memory_bytes == 10 * GiB
    assert row.headroom_bytes == 10 * GiB - WEIGHTS - 393_216_000
    assert row.verdict == "fits"
    assert row.bytes_per_decode_step == WEIGHTS + MEAN_STEP_KV
    assert row.tpot_ms_bound == pytest.approx((WEIGHTS + MEAN_STEP_KV) / BW_3080 * 1e3)
    assert row.tokens_per_s_bound == pytest.approx(877, rel=0.01)  # docs/deepspeed-notes.md
    assert row.speedup_bound == 1.0


def test_two_gpus_all_three_strategies():
    rows = by_strategy(plan("gpt2-xl", 2, "NVIDIA GeForce RTX 3080"))
    assert set(rows) == {("pure_data_parallel", 1), ("tensor_data_hybrid", 2),
                         ("pipeline_data_hybrid", 1)}
    dp = rows["pure_data_parallel", 1]
    assert dp.dp == 2 and dp.speedup_bound == pytest.approx(2.0)
    assert dp.tokens_per_s_bound == pytest.approx(2 * 4 * BW_3080 / (WEIGHTS + MEAN_STEP_KV))


def test_tensor_parallel_rank_zero_holds_13_of_25_heads():
    tp = by_strategy(plan("gpt2-xl", 2, "rtx3080"))["tensor_data_hybrid", 2]
    attn, ff = 13 * 64, 50 * 64  # 13 heads of 64; 100 MLP grains of 64 split 50/50
    block = (D * 3 * attn + 3 * attn) + (attn * D + D) + (D * ff + ff) + (ff * D + D) + 4 * D
    lm_head = 25129 * D  # ceil(50257 / 2) rows; wte stays whole (replicated)
    params = EMBED + 48 * block + 2 * D + lm_head
    assert tp.weight_bytes_per_rank == 2 * params
    assert tp.kv_cache_bytes_per_rank == pytest.approx(4 * 320 * KV_PER_TOKEN * 13 / 25, abs=1)
    step = 2 * params + MEAN_STEP_KV * 13 / 25
    assert tp.bytes_per_decode_step == pytest.approx(step)
    assert tp.tokens_per_s_bound == pytest.approx(4 * BW_3080 / step)
    assert 1.5 < tp.speedup_bound < 2.0  # replicated embeddings and the 13th head cost
    assert any("all-reduce" in note and "not modelled" in note for note in tp.notes)


def test_pipeline_two_stages_two_micro_batches():
    pp = by_strategy(plan("gpt2-xl", 2, "rtx3080"))["pipeline_data_hybrid", 1]
    stage0 = 2 * (EMBED + 24 * BLOCK)                # 1,639,657,600 bytes
    stage1 = 2 * (24 * BLOCK + 2 * D + 50257 * D)    # own lm_head: the tie crosses stages
    assert stage0 > stage1
    assert pp.micro_batches == 2
    assert pp.weight_bytes_per_rank == stage0
    kv_stage = MEAN_STEP_KV / 2  # 24 of 48 layers
    tick0, tick1 = stage0 + kv_stage / 2, stage1 + kv_stage / 2
    step_s = (tick0 + tick1 + tick0) / BW_3080  # sum of ticks + (m - 1) slowest
    assert pp.tpot_ms_bound == pytest.approx(step_s * 1e3)
    assert pp.tokens_per_s_bound == pytest.approx(4 / step_s)
    # Weights are re-read per micro-batch: no faster than one GPU for the same batch.
    assert pp.speedup_bound < 1.0
    assert any("latency is not lowered" in note for note in pp.notes)


def test_four_gpus_grids():
    rows = plan("gpt2-xl", 4, "h100")
    grids = {(r.strategy, r.dp, r.tp, r.pp) for r in rows}
    assert grids == {("pure_data_parallel", 4, 1, 1), ("tensor_data_hybrid", 2, 2, 1),
                     ("tensor_data_hybrid", 1, 4, 1), ("pipeline_data_hybrid", 2, 1, 2),
                     ("full_model_parallel", 1, 2, 2)}
    assert by_strategy(rows)["pure_data_parallel", 1].tokens_per_s_bound == pytest.approx(
        4 * 3870, rel=0.01)


def test_three_gpus_only_data_parallel():
    assert [r.strategy for r in plan("gpt2-xl", 3, "rtx3080")] == ["pure_data_parallel"]


def test_does_not_fit():
    # fp32 KV of 64 sequences x 1024 tokens: 64 * 1024 * 614,400 B = 37.5 GiB.
    rows = by_strategy(plan("gpt2-xl", 4, "rtx3080", 64, 512, 512, "float32"))
    dp = rows["pure_data_parallel", 1]
    assert dp.verdict == "does not fit" and dp.headroom_bytes < 0
    assert dp.total_bytes_per_rank == 4 * 1_557_611_200 + 64 * 1024 * 614_400
    assert "does not fit" in format_plan(list(rows.values()))


def test_unknown_gpu_lists_known_names():
    with pytest.raises(UserError, match="rtx3080.*h100"):
        plan("gpt2-xl", 1, "voodoo5")


def test_bad_inputs():
    with pytest.raises(UserError, match="gpt2-xl"):
        plan("gpt5", 1, "h100")
    with pytest.raises(UserError, match="1024"):
        plan("gpt2-xl", 1, "h100", 1, 1000, 64)
    with pytest.raises(UserError, match="gpus"):
        plan("gpt2-xl", 0, "h100")
    with pytest.raises(UserError, match="dtype"):
        plan("gpt2-xl", 1, "h100", dtype="int4")
    with pytest.raises(UserError, match="micro_batches"):
        plan("gpt2-xl", 2, "h100", 4, micro_batches=3)
    with pytest.raises(UserError, match="partition_method"):
        plan("gpt2-xl", 2, "h100", partition_method="type:transformer")


def test_micro_batches_fall_back_to_a_divisor_of_the_batch():
    pp = by_strategy(plan("gpt2-xl", 2, "h100", batch_size=1))["pipeline_data_hybrid", 1]
    assert pp.micro_batches == 1


def test_tiny_preset_dims():
    tiny = model_dims("tiny")
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.vocab_size) == (4, 5, 80, 512)
    assert model_dims("gpt2-xl").params == 1_557_611_200
    heads = [n for r in plan("tiny", 4, "h100", dtype="float32") for n in r.notes]
    assert any("heads 2/1/1/1" in n for n in heads)


def test_split_balanced_is_optimal():
    rng = random.Random(1)
    for _ in range(50):
        weights = [rng.randint(1, 20) for _ in range(rng.randint(2, 8))]
        parts = rng.randint(1, len(weights))
        bounds = _split_balanced(weights, parts)
        heaviest = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(max(sum(weights[a:b]) for a, b in zip((0, *cuts), (*cuts, len(weights))))
                   for cuts in itertools.combinations(range(1, len(weights)), parts - 1))
        assert heaviest == best and bounds[0] == 0 and bounds[-1] == len(weights)


def test_uniform_split_and_stage_blocks():
    assert _split_uniform(7, 3) == [0, 3, 5, 7]
    shares = stage_shares(model_dims("gpt2-xl"), tp=1, pp=2, partition_method="uniform")
    assert [s.layers for s in shares] == [(0, 25), (25, 50)]
    assert [s.kv_fraction for s in shares] == [0.5, 0.5]  # 24 blocks each


def test_format_plan_table():
    text = format_plan(plan("gpt2-xl", 2, "rtx3080"))
    lines = text.splitlines()
    assert "gpt2-xl float16 on 2 x GeForce RTX 3080" in lines[0]
    assert "760 GB/s" in lines[0]
    header = next(line for line in lines if line.startswith("strategy"))
    assert "tok/s <=" in header and "verdict" in header
    for strategy in ("pure_data_parallel", "tensor_data_hybrid", "pipeline_data_hybrid"):
        assert any(line.startswith(strategy) for line in lines)
    assert "fits (" in text and "2.90 GiB" in text  # 3,115,222,400 B of fp16 weights


def test_rank_fractions_feed_roofline_block():
    from gptbench.plan import rank_fractions
    from gptbench.roofline import roofline_block

    xl = model_dims("gpt2-xl")
    assert rank_fractions(xl, 1, 1) == (1.0, 1.0)
    weight_share, kv_share = rank_fractions(xl, 1, 2)
    assert weight_share == (EMBED + 24 * BLOCK) / 1_557_611_200 and kv_share == 0.5
    workload = {"dtype": "float16", "batch_size": 4, "input_len": 256, "output_len": 64}
    block = roofline_block(xl, workload, "rtx3080", 7.0, weight_share,
                           per_rank_kv_fraction=kv_share, pp=2, micro_batches=2)
    row = by_strategy(plan("gpt2-xl", 2, "rtx3080"))["pipeline_data_hybrid", 1]
    assert block["bytes_per_decode_step"] == pytest.approx(row.bytes_per_decode_step)
    # roofline_block takes stages as balanced; plan knows the lighter last stage.
    assert block["predicted_tokens_per_s"] == pytest.approx(row.tokens_per_s_bound, rel=0.002)
