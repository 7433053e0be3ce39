"""Parity criteria on constructed logits: exact fp32 tokens, near-ties within rounding in
fp16/bf16, a tolerance relative to the logit scale, and only logit holders checked."""
import pytest
import torch

from gptbench import parity

V = 8


def logits_row(top: float, second: float, scale: float = 100.0) -> torch.Tensor:
    """A (V,) reference row: token 0 on top, token 1 `top - second` below, one logit at
    -scale so that max |logit| is `scale`."""
    row = torch.full((V,), -1.0)
    row[0], row[1], row[V - 1] = top, second, -scale
    return row


def reference(rows_by_step):
    """(tokens (1, n), logits (n, 1, V)) of a one-sequence reference."""
    logits = torch.stack([r[None, :] for r in rows_by_step])
    return logits.argmax(-1).T.contiguous(), logits


def test_fp32_exact_tokens_even_at_a_near_tie():
    ref_tokens, ref_logits = reference([logits_row(5.0, 4.9999)])
    tokens = torch.tensor([[1]])  # the near-tied runner-up
    out = parity.compare(ref_tokens, ref_logits, tokens, [ref_logits[0]], torch.float32)
    assert out["tokens_match"] is False and out["real_mismatches"] == 1
    assert out["within_rounding"] == 0 and out["passed"] is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_near_tie_is_within_rounding(dtype):
    rel = parity.REL_TOLERANCE[dtype]
    margin = 0.5 * rel * 100.0  # half the tolerance at |logit| 100
    ref_tokens, ref_logits = reference([logits_row(5.0, 5.0 - margin), logits_row(3.0, 1.0)])
    tokens = torch.tensor([[1, 4]])  # parts at the tie; the next step has other inputs
    sharded = [ref_logits[0], torch.randn(1, V) * 50]  # after the tie: not comparable
    out = parity.compare(ref_tokens, ref_logits, tokens, sharded, dtype)
    assert out["within_rounding"] == 1 and out["real_mismatches"] == 0
    assert out["near_ties"] == [{"sequence": 0, "step": 0, "margin": pytest.approx(margin),
                                 "tolerance": pytest.approx(rel * 100.0)}]
    assert out["tokens_match"] is False and out["passed"] is True
    assert out["max_abs_logit_diff"] == 0.0  # step 1's random logits were not compared


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_clear_winner_differing_is_a_real_mismatch(dtype):
    rel = parity.REL_TOLERANCE[dtype]
    margin = 2.0 * rel * 100.0  # twice the tolerance
    ref_tokens, ref_logits = reference([logits_row(5.0, 5.0 - margin)])
    out = parity.compare(ref_tokens, ref_logits, torch.tensor([[1]]), [ref_logits[0]], dtype)
    assert out["real_mismatches"] == 1 and out["within_rounding"] == 0
    assert out["passed"] is False


def test_logit_tolerance_is_relative_to_the_logit_scale():
    # fp16's spacing at |logit| in [64, 128) is 0.0625: a fixed 0.05 bound fails there.
    for scale, diff, passed in ((100.0, 0.3, True), (100.0, 0.5, False), (1.0, 0.05, False)):
        ref_tokens, ref_logits = reference([logits_row(0.9, -0.5, scale)])
        sharded = ref_logits[0].clone()
        sharded[0, 2] += diff  # a logit that does not change the argmax
        out = parity.compare(ref_tokens, ref_logits, ref_tokens, [sharded], torch.float16)
        assert out["tokens_match"] is True
        assert out["max_abs_logit_diff"] == pytest.approx(diff, rel=1e-3)
        assert out["max_rel_logit_diff"] == pytest.approx(diff / scale, rel=1e-3)
        assert out["passed"] is passed, (scale, diff)
        assert out["tolerance"] == pytest.approx(parity.REL_TOLERANCE[torch.float16] * scale)


def test_logits_compared_per_sequence_up_to_its_first_divergence():
    # Two sequences; the second parts at step 0 (near-tie), the first never does.
    rows0 = [logits_row(5.0, 1.0), logits_row(5.0, 1.0)]
    rows1 = [logits_row(5.0, 5.0 - 0.01), logits_row(5.0, 1.0)]
    ref_logits = torch.stack([torch.stack([a, b]) for a, b in zip(rows0, rows1)])  # (2, 2, V)
    ref_tokens = ref_logits.argmax(-1).T.contiguous()                              # (2, 2)
    tokens = torch.tensor([[0, 0], [1, 3]])
    step1 = ref_logits[1].clone()
    step1[1] += 40.0   # sequence 1 after its divergence: ignored
    step1[0, 3] += 0.1  # sequence 0 still comparable: counted
    out = parity.compare(ref_tokens, ref_logits, tokens, [ref_logits[0], step1], torch.bfloat16)
    assert out["max_abs_logit_diff"] == pytest.approx(0.1, rel=1e-3)
    assert out["within_rounding"] == 1 and out["passed"] is True


def rank_dict(rank, check, is_output=True):
    return {"rank": rank, "is_output": is_output, "parity": check}


def test_only_ranks_holding_logits_count_as_checked():
    ref_tokens, ref_logits = reference([logits_row(5.0, 1.0)])
    inner = parity.compare(ref_tokens, ref_logits, ref_tokens, [None], torch.float32)
    last = parity.compare(ref_tokens, ref_logits, ref_tokens, [ref_logits[0]], torch.float32)
    assert inner["holds_logits"] is False and inner["max_abs_logit_diff"] is None
    p = parity.aggregate([rank_dict(0, inner, False), rank_dict(1, last)])
    assert p["ranks_checked"] == 1 and p["passed"] is True
    assert p["samples"] == 1  # the pipeline's one replica, counted once
    # Tokens alone, on ranks without logits, check nothing: not a pass.
    alone = parity.aggregate([rank_dict(0, inner, False)])
    assert alone["ranks_checked"] == 0 and alone["passed"] is False


def test_aggregate_fails_when_any_rank_fails_and_worst_logit_wins():
    ref_tokens, ref_logits = reference([logits_row(5.0, 1.0)])
    good = parity.compare(ref_tokens, ref_logits, ref_tokens, [ref_logits[0]], torch.float32)
    worse = ref_logits[0].clone()
    worse[0, 3] += 3e-5
    off = parity.compare(ref_tokens, ref_logits, torch.tensor([[1]]), [worse], torch.float32)
    p = parity.aggregate([rank_dict(0, good), rank_dict(1, off)])
    assert p["tokens_match"] is False and p["passed"] is False
    assert p["max_abs_logit_diff"] == pytest.approx(3e-5, rel=1e-2)
    assert p["real_mismatches"] == 1 and p["ranks_tokens_match"] == [True, False]


def test_a_real_model_in_bf16_passes_against_its_fp32_self(tiny_model):
    """The unsharded tiny model in bf16 against its fp32 reference: any differing token
    must be a near-tie of the fp32 logits, and the logits stay within the bf16 tolerance."""
    import copy

    model = tiny_model()
    probe = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = parity.reference(model, probe, 8)
    half = copy.deepcopy(model).to(torch.bfloat16)
    tokens, logits = parity.reference(half, probe, 8)
    out = parity.compare(ref_tokens, ref_logits, tokens, list(logits), torch.bfloat16)
    assert out["real_mismatches"] == 0, out["near_ties"]
    assert out["max_rel_logit_diff"] <= parity.REL_TOLERANCE[torch.bfloat16]
    assert out["passed"] is True
