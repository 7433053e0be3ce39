"""Parity: the strategy's greedy tokens and logits against the unsharded Hugging Face model.

The reference is `GPT2LMHeadModel.generate` (greedy, same weights, single process), run on
each replica's probe before the model is sharded. The criteria:
- logits are compared at every step whose inputs still agree (per sequence: up to and
  including its first differing token), with a tolerance *relative to the logit scale*
  (max |logit| of the reference at that step): a fixed absolute bound would sit below
  fp16's own spacing for |logit| >= 64 (0.0625);
- float32 must give exactly the reference's tokens;
- in float16/bfloat16 the sharded reduction order changes the rounding, so where the
  reference's top two logits at a step are closer than the tolerance (a near-tie: the
  reference's top-1 minus its logit of the token chosen instead is below it), a different
  token is "within rounding"; any other differing token is a real mismatch;
- only ranks that hold logits (not the inner stages of a pipeline, which only receive the
  tokens) count as checked.
"""
from __future__ import annotations

import torch

REFERENCE = "transformers GPT2LMHeadModel.generate, greedy, unsharded, same weights"
# Relative to max |reference logit| of the step. fp32: the sharded sums' rounding is
# ~1e-7 relative (max |Δlogit| ~4e-6 at |logit| ~10 on the tiny model); bf16 and fp16:
# 8 units of roundoff (2^-8 and 2^-11) for the error a few dozen layers accumulate.
REL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -5, torch.float16: 2.0 ** -8}
CRITERION = {
    torch.float32: "tokens equal to the reference; |Δlogit| <= tolerance x max |logit|",
    torch.bfloat16: "tokens equal except near-ties within rounding; |Δlogit| <= tolerance x max |logit|",
    torch.float16: "tokens equal except near-ties within rounding; |Δlogit| <= tolerance x max |logit|",
}


@torch.no_grad()
def reference(model, probe: torch.Tensor, n_tokens: int):
    """(tokens (B, n), logits (n, B, V)) of plain greedy `generate`."""
    # eos_token_id=None: no early stop and no EOS masking (min_new_tokens would set the EOS
    # logit to -inf), so this decodes exactly like the runner, which ignores EOS.
    out = model.generate(probe, attention_mask=torch.ones_like(probe), do_sample=False,
                         max_new_tokens=n_tokens, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, probe.shape[1]:], torch.stack(out.logits).float()


def _first_divergence(same: torch.Tensor) -> list[int]:
    """Per sequence, the first step whose token differs (n when none does)."""
    n = same.shape[1]
    return [int((~row).nonzero()[0]) if not bool(row.all()) else n for row in same]


def compare(ref_tokens, ref_logits, tokens, logits, dtype: torch.dtype, tolerance=None) -> dict:
    """One rank's verdict. ref_tokens/tokens (B, n); ref_logits (n, B, V); logits: per step
    (B, V) or None where this rank holds none. `tolerance`: relative (parity.tolerance)."""
    rel = REL_TOLERANCE[dtype] if tolerance is None else tolerance
    ref_tokens, tokens, ref_logits = ref_tokens.cpu(), tokens.cpu(), ref_logits.cpu().float()
    same = ref_tokens == tokens                                      # (B, n)
    n = same.shape[1]
    diverge = _first_divergence(same)
    scale = ref_logits.abs().amax(-1).clamp_min(1e-30)              # (n, B)
    holds = [i for i in range(min(n, len(logits))) if logits[i] is not None]
    max_abs = max_rel = None
    for i in holds:
        diff = (ref_logits[i] - logits[i].float().cpu()).abs().amax(-1)  # (B,)
        for b in range(ref_tokens.shape[0]):
            if i <= diverge[b]:  # same inputs up to (and at) the first differing token
                d, r = diff[b].item(), diff[b].item() / scale[i, b].item()
                max_abs, max_rel = max(max_abs or 0.0, d), max(max_rel or 0.0, r)
    near_ties, real = [], 0
    for b, step in enumerate(diverge):
        if step == n:
            continue
        row = ref_logits[step, b]
        gap = (row.max() - row[tokens[b, step]]).item()  # >= the top-1/top-2 margin
        allowed = rel * scale[step, b].item()
        if dtype != torch.float32 and gap <= allowed:
            near_ties.append({"sequence": b, "step": step, "margin": gap, "tolerance": allowed})
        else:
            real += 1
    logits_ok = max_rel is None or max_rel <= rel
    return {
        "reference": REFERENCE,
        "criterion": CRITERION[dtype],
        "holds_logits": bool(holds),
        "tokens_match": bool(same.all()),
        "token_match_rate": same.float().mean().item(),
        "within_rounding": len(near_ties),
        "near_ties": near_ties,
        "real_mismatches": real,
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": max_rel,
        "tolerance_relative": rel,
        # The absolute bound at the largest logit compared: max_abs_logit_diff above it
        # always fails; below it, each step is still judged at its own scale.
        "tolerance": rel * scale.max().item(),
        "passed": logits_ok and real == 0,
        "samples": int(ref_tokens.shape[0]),
        "tokens": int(n),
    }


def aggregate(ranks: list[dict]) -> dict | None:
    """The record's `parity`: every rank's verdict must pass; only ranks that hold logits
    count as checked (results.aggregate_parity calls this)."""
    checks = [r["parity"] for r in ranks if r.get("parity")]
    if not checks:
        return None
    holders = [c for c in checks if c.get("holds_logits")]
    diffs = [c["max_abs_logit_diff"] for c in holders if c["max_abs_logit_diff"] is not None]
    rels = [c["max_rel_logit_diff"] for c in holders if c.get("max_rel_logit_diff") is not None]
    return {
        "reference": checks[0]["reference"],
        "criterion": checks[0].get("criterion"),
        "tokens_match": all(c["tokens_match"] for c in checks),
        "token_match_rate": sum(c["token_match_rate"] for c in holders or checks)
                            / len(holders or checks),
        "within_rounding": sum(c.get("within_rounding", 0) for c in holders),
        "real_mismatches": sum(c.get("real_mismatches", 0) for c in holders),
        "max_abs_logit_diff": max(diffs) if diffs else None,
        "max_rel_logit_diff": max(rels) if rels else None,
        "tolerance": max(c["tolerance"] for c in holders or checks),
        "tolerance_relative": checks[0].get("tolerance_relative"),
        "passed": bool(holders) and all(c["passed"] for c in checks),
        "samples": sum(r["parity"]["samples"] for r in ranks if r["is_output"] and r["parity"]),
        "tokens": checks[0]["tokens"],
        "ranks_checked": len(holders),
        "ranks_tokens_match": [c["tokens_match"] for c in holders],
    }
