"""The sharding model against hand computation (GPT-2 XL) and DeepSpeed's real shards
(the tiny model's per-rank parameter counts, read from real runs' `params_per_rank`;
tests/integration/test_breakdown.py checks them again on runs made by the current code)."""
import pytest

from gptbench import sharding
from gptbench.plan import model_dims
from gptbench.roofline import DEVICES, layout_bound_s, roofline_block

XL = model_dims("gpt2-xl")
TINY = model_dims("tiny")
D, V, P = 1600, 50257, 1024
BLOCK = 12 * D * D + 13 * D
KV_TOKEN_FP16 = 2 * 48 * D * 2       # 307,200 B per token per sequence
MEAN_CONTEXT = 256 + 64 / 2          # 288


def xl(tp=1, pp=1, m=1, batch=4, schedule="flush"):
    return sharding.layout(XL, 1, tp, pp, m, batch, 256, 64, 2, schedule)


def test_tensor_parallel_decode_bytes_by_hand():
    """GPT-2 XL fp16, tp=2, batch 4, 256 -> 64: rank 0 holds 13 of 25 heads."""
    lay = xl(tp=2)
    attn, ff = 13 * 64, 50 * 64          # 13 heads of 64; 100 MLP grains of 64 split 50/50
    block0 = (D * 3 * attn + 3 * attn) + (attn * D + D) + (D * ff + ff) + (ff * D + D) + 4 * D
    assert block0 == 15_580_096
    lm_head0 = V * 832                   # split along its 1600 input features: 832/768
    rows = 2 * 4 * D                     # the step gathers 4 rows of wte and 4 of wpe
    weights_read = 48 * block0 + 2 * D + lm_head0 + rows
    kv = 4 * MEAN_CONTEXT * KV_TOKEN_FP16 * 13 / 25
    rank0 = lay.ranks[0]
    assert lay.decode_step_bytes(rank0) == pytest.approx(2 * weights_read + kv)
    assert lay.decode_step_bytes(rank0) == pytest.approx(1_763_373_952)
    # One GPU reads all blocks, the lm_head (= wte, tied) and 4 + 4 embedding rows.
    one = xl()
    assert one.decode_step_bytes(one.ranks[0]) == pytest.approx(
        2 * (48 * BLOCK + 2 * D + V * D + rows) + 4 * MEAN_CONTEXT * KV_TOKEN_FP16)
    speedup = layout_bound_s(DEVICES["rtx3080"], one) / layout_bound_s(DEVICES["rtx3080"], lay)
    assert speedup == pytest.approx(3_465_865_600 / 1_763_373_952)
    assert 1.96 < speedup < 1.97  # counting the replicated tables whole gave 1.80


def test_tensor_parallel_holds_whole_embeddings():
    lay = xl(tp=2)
    held = lay.ranks[0].weight_params
    assert held == (V + P) * D + 48 * 15_580_096 + 2 * D + V * 832  # wte, wpe replicated
    assert lay.memory()["weights"] == [2 * held, 2 * lay.ranks[1].weight_params]


def test_roofline_block_uses_the_same_bytes():
    lay = xl(tp=2)
    block = roofline_block(lay, "NVIDIA GeForce RTX 3080", 3.0)
    assert block["bytes_per_decode_step"] == pytest.approx(1_763_373_952)
    assert block["achieved_gbps"] == pytest.approx(1_763_373_952 / 3e-3 / 1e9)
    assert block["fraction_of_peak"] == pytest.approx(1_763_373_952 / 3e-3 / 760e9)
    assert block["predicted_tokens_per_s"] == pytest.approx(4 / layout_bound_s(DEVICES["rtx3080"], lay))


def test_pipeline_stage_reads_its_weights_per_micro_batch():
    lay = xl(pp=2, m=2)
    s0, s1 = lay.ranks
    assert s0.layers == (0, 25) and s1.layers == (25, 50)
    # Stage 0: embeddings held whole, 2 + 2 rows per micro-batch of 2 read; 24 blocks.
    assert s0.weight_params == (V + P) * D + 24 * BLOCK
    assert lay.decode_step_bytes(s0) == pytest.approx(
        2 * 2 * (24 * BLOCK + 2 * 2 * D) + 4 * MEAN_CONTEXT * KV_TOKEN_FP16 / 2)
    # Stage 1: the tied lm_head is its own vocab x d copy here.
    assert s1.weight_params == 24 * BLOCK + 2 * D + V * D


def test_memory_of_m_caches_per_stage_equals_one_batch():
    flush, in_flight = xl(pp=2, m=2), xl(pp=2, m=2, schedule="in_flight")
    assert flush.memory() == in_flight.memory()
    kv0 = flush.memory()["kv"][0]
    assert kv0 == 4 * 320 * KV_TOKEN_FP16 // 2  # 24 of 48 blocks, all 4 sequences


# Measured: params_per_rank of real tiny runs (AutoTP, PipelineModule, partition uniform).
TINY_REAL = {(2, 1): [273_632, 244_768], (1, 2): [237_600, 196_800],
             (2, 2): [165_408, 155_072, 108_224, 89_696]}


@pytest.mark.parametrize("tp,pp", list(TINY_REAL))
def test_tiny_shards_equal_deepspeeds(tp, pp):
    lay = sharding.layout(TINY, 1, tp, pp, pp, 4, 32, 8, 4, partition_method="uniform")
    assert [s.weight_params for s in lay.ranks] == TINY_REAL[tp, pp]


def test_memory_is_listed_by_global_rank():
    # tp2 x dp2: ranks 0,1 replica 0 and 2,3 replica 1, each [tensor rank 0, 1].
    lay = sharding.layout(TINY, 2, 2, 1, 1, 4, 32, 8, 4)
    weights = lay.memory()["weights"]
    assert weights == [4 * n for n in TINY_REAL[2, 1] * 2]
    # pp2 x dp2: ranks 0, 1 are stage 0 of both replicas.
    lay = sharding.layout(TINY, 2, 1, 2, 2, 4, 32, 8, 4, partition_method="uniform")
    assert lay.memory()["weights"] == [4 * n for n in (237_600, 237_600, 196_800, 196_800)]


def test_collectives_per_step():
    tp2 = {(c.op, c.nbytes): c.per_step for c in xl(tp=2).collectives()}
    assert tp2 == {("all_reduce", 4 * D * 2): 96, ("all_reduce", 4 * V * 2): 1}
    flush = xl(pp=2, m=2).collectives()
    assert sum(c.per_step for c in flush if c.op == "p2p") == 2 * 2  # metadata + hidden, x 2 micro-batches
    assert [c.op for c in flush if c.where == "step"] == ["barrier", "broadcast"]
    in_flight = xl(pp=2, m=2, schedule="in_flight").collectives()
    assert {c.where for c in in_flight} == {"hop", "back"}  # no barrier inside a generation
    full = sharding.layout(XL, 1, 2, 2, 2, 4, 256, 64, 2, partition_method="uniform")
    blocks = [c for c in full.collectives() if c.op == "all_reduce" and c.nbytes == 2 * D * 2]
    # 2 all-reduces per block per micro-batch of 2, on each stage's 24 blocks
    assert [(c.stage, c.per_step) for c in blocks] == [(0, 2 * 24 * 2), (1, 2 * 24 * 2)]


def test_host_memory_while_loading():
    lay = xl(tp=2)
    whole = 2 * XL.params
    assert sharding.host_memory_bytes(lay, "cpu") == [whole + lay.weight_bytes(s) for s in lay.ranks]
    assert sharding.host_memory_bytes(xl(pp=2, m=2), "cpu") == [whole, whole]
    assert sharding.host_memory_bytes(lay, "cuda", "random") == [0, 0]


def test_grain_shares_follow_deepspeed():
    assert sharding.grain_shares(1600, 2, 64) == [832, 768]
    assert sharding.grain_shares(1600, 4, 64) == [448, 384, 384, 384]
    assert sharding.grain_shares(100, 3, 64) == [64, 0, 36]  # the tail goes to the last rank
    assert sharding.heads_per_rank(25, 4) == [7, 6, 6, 6]
