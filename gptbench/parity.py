"""Parity: the strategy's greedy tokens and logits against the unsharded Hugging Face model.

The reference is `GPT2LMHeadModel.generate` (greedy, same weights, single process), run on
each replica's probe before the model is sharded. fp32 must match token for token; in
bf16/fp16 the reduction order of a sharded matmul changes the rounding, so tokens may part
after a near-tie: there the record keeps the token-match rate and the logit difference
against a looser, stated tolerance instead of a hard gate.
"""
from __future__ import annotations

import torch

REFERENCE = "transformers GPT2LMHeadModel.generate, greedy, unsharded, same weights"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}


@torch.no_grad()
def reference(model, probe: torch.Tensor, n_tokens: int):
    """(tokens (B, n), logits (n, B, V)) of plain greedy `generate`."""
    # eos_token_id=None: no early stop and no EOS masking (min_new_tokens would set the EOS
    # logit to -inf), so this decodes exactly like the runner, which ignores EOS.
    out = model.generate(probe, attention_mask=torch.ones_like(probe), do_sample=False,
                         max_new_tokens=n_tokens, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, probe.shape[1]:], torch.stack(out.logits).float()


def compare(ref_tokens, ref_logits, tokens, logits, dtype: torch.dtype, tolerance=None) -> dict:
    """Logits are compared only while both token streams still agree (same inputs)."""
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    same = (ref_tokens.cpu() == tokens.cpu())                       # (B, n)
    agree_until = int(same.all(0).long().cumprod(0).sum().item())   # steps with equal inputs
    diffs = [(ref_logits[i].cpu() - logits[i].float().cpu()).abs().max().item()
             for i in range(min(agree_until + 1, len(logits))) if logits[i] is not None]
    max_diff = max(diffs) if diffs else None  # None: this rank holds no logits (a pipe stage)
    tokens_match = bool(same.all())
    return {
        "reference": REFERENCE,
        "tokens_match": tokens_match,
        "token_match_rate": same.float().mean().item(),
        "max_abs_logit_diff": max_diff,
        "tolerance": tol,
        "passed": ((max_diff is None or max_diff <= tol)
                   and (tokens_match or dtype != torch.float32)),
        "samples": int(ref_tokens.shape[0]),
        "tokens": int(ref_tokens.shape[1]),
    }
