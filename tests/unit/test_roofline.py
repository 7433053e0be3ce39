"""Roofline arithmetic checked by hand against the GPT-2 XL numbers of docs/deepspeed-notes.md."""
import pytest
import torch

from gptbench import sharding
from gptbench.errors import UserError
from gptbench.roofline import (
    DEVICES,
    ModelDims,
    bubble_theory,
    custom_device,
    decode_step_bound_s,
    dtype_bytes,
    gpt2_params,
    kv_bytes_per_token,
    layout_bound_s,
    match_device,
    non_embedding_params,
    predict_tpot,
    prefill_flops,
    roofline_block,
    token_time_s,
)
from gptbench.sharding import mean_decode_context

XL_SIZES = dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, n_positions=1024)
XL = ModelDims(**XL_SIZES, params=1_557_611_200)
FP16 = 2


def test_gpt2_xl_params_by_parts():
    d = 1600
    wte, wpe = 50257 * d, 1024 * d
    per_layer = 12 * d * d + 13 * d
    ln_f = 2 * d
    assert wte + wpe + 48 * per_layer + ln_f == 1_557_611_200
    assert gpt2_params(**XL_SIZES) == 1_557_611_200
    assert gpt2_params(**XL_SIZES, tied_embeddings=False) == 1_557_611_200 + wte
    assert non_embedding_params(XL) == 48 * per_layer + ln_f


@pytest.mark.parametrize("tied", [True, False])
def test_params_match_hugging_face(tied):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # shapes only: no 6 GB allocation
        model = GPT2LMHeadModel(GPT2Config(**XL_SIZES, tie_word_embeddings=tied))
    assert sum(p.numel() for p in model.parameters()) == gpt2_params(**XL_SIZES,
                                                                     tied_embeddings=tied)


def test_model_dims_of_mapping_computes_params():
    assert ModelDims.of(XL_SIZES) == XL
    with pytest.raises(UserError, match="vocab_size"):
        ModelDims.of({"n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8})


def test_bytes():
    assert kv_bytes_per_token(XL, FP16) == 307_200
    assert dtype_bytes("bfloat16") == 2 and dtype_bytes("float32") == 4
    for alias in ("int3", "fp16", "half"):  # one vocabulary: the config's
        with pytest.raises(UserError, match="is not one of float32, bfloat16, float16"):
            dtype_bytes(alias)


def one_gpu(batch=4):
    return sharding.layout(XL, 1, 1, 1, 1, batch, 256, 64, FP16)


def test_one_gpu_decode_bytes_and_bound():
    # Blocks, ln_f, the tied lm_head (= wte, read whole by the logits matmul), 4 + 4
    # gathered embedding rows, and the KV of 4 sequences at the mean context 288.
    assert mean_decode_context(256, 64) == 288
    weights = 48 * (12 * 1600 ** 2 + 13 * 1600) + 2 * 1600 + 50257 * 1600 + 8 * 1600
    lay = one_gpu()
    step = 2 * weights + 4 * 288 * 307_200
    assert lay.decode_step_bytes(lay.ranks[0]) == step
    for device, design_tokens_per_s in (("rtx3080", 877), ("h100", 3870)):
        spec = DEVICES[device]
        bound = 4 / layout_bound_s(spec, lay)
        assert bound == pytest.approx(4 * spec.memory_bandwidth_bytes_per_s / step, rel=1e-12)
        assert bound == pytest.approx(design_tokens_per_s, rel=0.01)


def test_prefill_flops():
    n = non_embedding_params(XL)
    attention = 4 * 48 * 256 * 1600  # per token, QK^T and AV
    lm_head = 2 * 1600 * 50257       # per position with logits
    all_positions = prefill_flops(XL, 4, 256, logits_for_all_positions=True)
    assert all_positions == 1024 * (2 * n + attention) + 1024 * lm_head
    assert all_positions == pytest.approx(3.27e12, rel=0.01)  # docs/deepspeed-notes.md
    assert prefill_flops(XL, 4, 256) == 1024 * (2 * n + attention) + 4 * lm_head


def test_flow_shop_step_bound():
    spec = DEVICES["rtx3080"]
    bw = spec.memory_bandwidth_bytes_per_s
    # Two equal stages, 2 micro-batches: (m + p - 1) = 3 ticks of (w + kv/m).
    assert decode_step_bound_s(spec, [(100.0, 40.0)] * 2, 2) == pytest.approx(3 * 120 / bw)
    # Unequal stages, m = 3: sum of ticks + 2 more of the slowest.
    step = decode_step_bound_s(spec, [(90.0, 30.0), (150.0, 30.0)], 3)
    assert step == pytest.approx((100 + 160 + 2 * 160) / bw)
    assert decode_step_bound_s(spec, [(7.0, 3.0)]) == pytest.approx(10 / bw)


def test_token_time_of_both_schedules():
    # flush: every stage but the first receives first; sum(ticks) + (m-1) max tick + once.
    assert token_time_s([1.0, 2.0], 3, "flush", hop_s=0.5, step_sync_s=0.25) == 1 + 2.5 + 2 * 2.5 + 0.25
    # in flight: the busiest stage serves m micro-batches, or a lap of the ring is longer;
    # the first stage receives the new tokens (back), the others the hidden states (hop).
    assert token_time_s([1.0, 2.0], 3, "in_flight", hop_s=0.5) == 3 * 2.5
    assert token_time_s([1.0, 1.0], 2, "in_flight", hop_s=1.0, back_s=0.5) == 2 * 2.0
    assert token_time_s([1.0, 1.0, 1.0], 2, "in_flight", hop_s=1.0) == 3 * 2.0  # the lap
    # Equal ticks t, m = p = 2: flush 3t, in flight 2t; one stage: m ticks.
    assert token_time_s([1.0, 1.0], 2, "flush") == 3.0
    assert token_time_s([1.0, 1.0], 2, "in_flight") == 2.0
    assert token_time_s([1.5], 1, "none", step_sync_s=0.5) == 2.0


def test_bubble_theory_of_both_schedules():
    assert bubble_theory(2, 2, "flush", 64) == pytest.approx(1 / 3)
    assert bubble_theory(2, 2, "in_flight", 64) == pytest.approx(1 / 129)  # ~1% (issue 15)
    assert bubble_theory(4, 8, "flush", 8) == pytest.approx(3 / 11)
    assert bubble_theory(1, 1, "flush", 8) is None


def test_predicted_tpot_adds_collectives_at_their_latency():
    tp2 = sharding.layout(XL, 1, 2, 1, 1, 4, 256, 64, FP16)
    latency = lambda op, group_size, nbytes: 100.0 if nbytes < 100_000 else 300.0  # noqa: E731
    out = predict_tpot(tp2, [0.002], latency, "given", "test")
    # 96 block all-reduces of 12.8 kB at 100 µs + the lm_head's 402 kB logits at 300 µs.
    assert out["comm_ms_per_token"] == pytest.approx(96 * 0.1 + 0.3)
    assert out["tpot_ms"] == pytest.approx(2.0 + 9.6 + 0.3)
    assert out["unknown_latency"] is None
    flush = sharding.layout(XL, 1, 1, 2, 2, 4, 256, 64, FP16)
    out = predict_tpot(flush, [0.004, 0.004], lambda *a: 10.0, "given", "test")
    tick = 0.002  # 4 ms of compute per step over 2 micro-batches
    hop = 2 * 10e-6  # metadata, hidden: stage 1 receives them on each of its ticks
    assert out["tpot_ms"] == pytest.approx(1e3 * (tick + 2 * (tick + hop) + 2 * 10e-6))
    out = predict_tpot(flush, [0.004, 0.004], None, "given", "none")
    assert out["comm_ms_per_token"] == 0 and "barrier on world (0 B)" in out["unknown_latency"]


def test_custom_device():
    card = custom_device(24, 936, "RTX 3090")
    assert card.memory_bytes == 24 * 2 ** 30 and card.memory_bandwidth_bytes_per_s == 936e9
    h100 = custom_device(None, 2000, base=DEVICES["h100"])
    assert h100.memory_bytes == DEVICES["h100"].memory_bytes
    with pytest.raises(UserError, match="--gpu-bandwidth-gbps"):
        custom_device(24, 0)


@pytest.mark.parametrize("name,key", [
    ("NVIDIA GeForce RTX 3080", "rtx3080"),
    ("rtx3080", "rtx3080"),
    ("RTX 3080", "rtx3080"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA A10", "a10"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb-pcie"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("h100", "h100"),
    ("H100", "h100"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", "h200-nvl"),
])
def test_match_device(name, key):
    assert match_device(name).key == key


@pytest.mark.parametrize("name", ["cpu", "", None, "NVIDIA GeForce RTX 3080 Ti",
                                  "NVIDIA A10G", "NVIDIA L40S", "NVIDIA GH200 480GB"])
def test_unknown_devices_stay_unknown(name):
    assert match_device(name) is None


def test_every_key_matches_itself():
    for key, spec in DEVICES.items():
        assert match_device(key) is spec


def test_device_table_units():
    h100 = DEVICES["h100"]
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12
    assert h100.memory_bytes == 80 * 2 ** 30
    assert DEVICES["rtx3080"].memory_bandwidth_bytes_per_s == 760e9
    assert DEVICES["rtx3080"].memory_bytes == 10 * 2 ** 30
    # SXM and PCIe A100 80GB differ (2,039 vs 1,935 GB/s).
    assert DEVICES["a100-80gb"].memory_bandwidth_bytes_per_s == 2039e9
    assert DEVICES["a100-80gb-pcie"].memory_bandwidth_bytes_per_s == 1935e9


def test_roofline_block_on_known_device():
    lay = one_gpu()
    step_bytes = lay.decode_step_bytes(lay.ranks[0])
    block = roofline_block(lay, "NVIDIA GeForce RTX 3080", 5.0)
    assert block["bytes_per_decode_step"] == step_bytes
    assert block["achieved_gbps"] == pytest.approx(step_bytes / 5e-3 / 1e9)
    assert block["device_peak_gbps"] == 760.0
    assert block["fraction_of_peak"] == pytest.approx(step_bytes / 5e-3 / 760e9)
    assert block["predicted_tokens_per_s"] == pytest.approx(877, rel=0.01)
    assert block["prefill_flops"] == prefill_flops(XL, 4, 256)
    assert block["reason"] is None


def test_roofline_block_unknown_device_is_null_with_reason():
    block = roofline_block(one_gpu(), "cpu", 50.0)
    assert block["device_peak_gbps"] is None
    assert block["fraction_of_peak"] is None
    assert block["predicted_tokens_per_s"] is None
    assert block["achieved_gbps"] is not None  # bytes / time needs no device
    assert "cpu" in block["reason"]


def test_roofline_block_without_tpot():
    block = roofline_block(one_gpu(), "h100", None)
    assert block["achieved_gbps"] is None and block["fraction_of_peak"] is None
    assert block["predicted_tokens_per_s"] is not None
    assert "TPOT" in block["reason"]


def test_roofline_block_pipeline_reads_weights_per_micro_batch():
    lay = sharding.layout(XL, 2, 1, 2, 2, 4, 256, 64, FP16, partition_method="uniform")
    block = roofline_block(lay, "rtx3080", 5.0)
    stage0 = lay.ranks[0]
    assert block["bytes_per_decode_step"] == lay.decode_step_bytes(lay.slowest())
    assert lay.decode_step_bytes(stage0) == pytest.approx(
        2 * 2 * (24 * (12 * 1600 ** 2 + 13 * 1600) + 2 * 2 * 1600) + 4 * 288 * 307_200 / 2)
    ticks = [b / 2 / 760e9 for b in lay.stage_step_bytes()]
    assert block["predicted_tokens_per_s"] == pytest.approx(2 * 4 / (sum(ticks) + max(ticks)))


def test_in_flight_busiest_stage_pays_a_waiting_inputs_receive():
    # p2p issued together: 10 µs; a receive whose input was already waiting: 300 µs.
    lay = sharding.layout(XL, 1, 1, 2, 2, 4, 256, 64, FP16, "in_flight")
    latency = lambda op, g, n: 300.0 if op == "p2p_ready" else 10.0  # noqa: E731
    out = predict_tpot(lay, [0.004, 0.002], latency, "given", "test")
    assert out["ready_receive_ms"] == pytest.approx([0.3, 0.3])
    # stage 0 is the busiest: 2 micro-batches x (2 ms of compute + a 0.3 ms receive)
    assert out["tpot_ms"] == pytest.approx(2 * (2.0 + 0.3))
