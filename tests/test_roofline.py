"""Roofline arithmetic checked by hand against the GPT-2 XL numbers of docs/deepspeed-notes.md."""
import pytest
import torch

from gptbench.errors import UserError
from gptbench.roofline import (DEVICES, ModelDims, decode_bound_tokens_per_s,
                               decode_bytes_per_step, decode_step_bound_s, dtype_bytes,
                               gpt2_params, kv_bytes_per_token, match_device,
                               mean_decode_context, non_embedding_params, prefill_flops,
                               roofline_block, weight_bytes)

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
    assert weight_bytes(XL.params, FP16) == 3_115_222_400
    assert dtype_bytes("bfloat16") == 2 and dtype_bytes("float32") == 4
    with pytest.raises(UserError, match="int3"):
        dtype_bytes("int3")


def test_decode_bytes_per_step():
    # 3,115,222,400 weights + 4 sequences * 288 tokens * 307,200
    assert mean_decode_context(256, 64) == 288
    assert decode_bytes_per_step(XL, 4, 288, FP16) == 3_115_222_400 + 4 * 288 * 307_200
    half = decode_bytes_per_step(XL, 4, 288, FP16, weight_fraction=0.5, kv_fraction=0.25)
    assert half == 3_115_222_400 / 2 + 4 * 288 * 307_200 / 4


@pytest.mark.parametrize("device,design_tokens_per_s", [("rtx3080", 877), ("h100", 3870)])
def test_decode_bound_matches_design(device, design_tokens_per_s):
    spec = DEVICES[device]
    bound = decode_bound_tokens_per_s(spec, XL, batch=4, input_len=256, output_len=64,
                                      dtype_bytes=FP16)
    hand = 4 * spec.memory_bandwidth_bytes_per_s / (3_115_222_400 + 4 * 288 * 307_200)
    assert bound == pytest.approx(hand, rel=1e-12)
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


WORKLOAD = {"dtype": "float16", "batch_size": 4, "input_len": 256, "output_len": 64}


def test_roofline_block_on_known_device():
    step_bytes = 3_115_222_400 + 4 * 288 * 307_200
    block = roofline_block(XL_SIZES, WORKLOAD, "NVIDIA GeForce RTX 3080", 5.0, 1.0)
    assert block["bytes_per_decode_step"] == step_bytes
    assert block["achieved_gbps"] == pytest.approx(step_bytes / 5e-3 / 1e9)
    assert block["device_peak_gbps"] == 760.0
    assert block["fraction_of_peak"] == pytest.approx(step_bytes / 5e-3 / 760e9)
    assert block["predicted_tokens_per_s"] == pytest.approx(877, rel=0.01)
    assert block["prefill_flops"] == prefill_flops(XL, 4, 256)
    assert block["reason"] is None


def test_roofline_block_unknown_device_is_null_with_reason():
    block = roofline_block(XL_SIZES, WORKLOAD, "cpu", 50.0)
    assert block["device_peak_gbps"] is None
    assert block["fraction_of_peak"] is None
    assert block["predicted_tokens_per_s"] is None
    assert block["achieved_gbps"] is not None  # bytes / time needs no device
    assert "cpu" in block["reason"]


def test_roofline_block_without_tpot_or_dtype():
    block = roofline_block(XL_SIZES, WORKLOAD, "h100", None)
    assert block["achieved_gbps"] is None and block["fraction_of_peak"] is None
    assert block["predicted_tokens_per_s"] is not None
    assert "TPOT" in block["reason"]
    block = roofline_block(XL_SIZES, {**WORKLOAD, "dtype": "auto"}, "h100", 5.0)
    assert block["bytes_per_decode_step"] is None and "auto" in block["reason"]


def test_roofline_block_pipeline_reads_weights_per_micro_batch():
    # A stage with half the weights and half the KV, 2 micro-batches, 2 stages.
    block = roofline_block(XL_SIZES, WORKLOAD, "rtx3080", 5.0, 0.5, pp=2, micro_batches=2)
    weights, kv = 3_115_222_400 / 2, 4 * 288 * 307_200 / 2
    assert block["bytes_per_decode_step"] == pytest.approx(2 * weights + kv)
    step_s = 3 * (weights + kv / 2) / 760e9
    assert block["predicted_tokens_per_s"] == pytest.approx(4 / step_s)
