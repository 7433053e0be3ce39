"""The baselines a user would run instead of gptbench's DeepSpeed paths (one rank, no
DeepSpeed, nothing sharded):

- `hf_eager`: the plain Hugging Face model stepped with its dynamic KV cache, the way most
  scripts run it;
- `hf_compiled`: Hugging Face `generate(..., cache_implementation="static")` with its
  compile config (transformers compiles the decode step itself, CUDA graphs on CUDA).
  `generate` runs the whole loop, so its times come from a logits processor that marks
  each step's logits (trackers/timing.py Stamps, as every generator): TTFT at the first new
  token's logits, TPOT between later ones.
"""
from __future__ import annotations

import copy

import torch

from gptbench.runner import BatchTiming
from gptbench.strategies.base import CachedLM, RankContext


def build(ctx: RankContext):
    if ctx.cfg.engine.backend == "hf_eager":
        return CachedLM(ctx.model, ctx.model.config)
    w = ctx.cfg.workload
    return HFGenerate(ctx.model, ctx.info["compile_mode"], ctx.device,
                      w.input_len + w.output_len)


class _Marks:
    """A logits processor that marks when each step's logits exist (it runs once per new
    token, on the device's stream, reading nothing back: no synchronisation of its own)."""

    def __init__(self, stamps):
        self.stamps, self.marks = stamps, []

    def __call__(self, input_ids, scores):
        self.marks.append(self.stamps.mark())
        return scores


class _StopAt:
    """Stop once sequences reach `length` tokens. `generate` sizes its static cache from
    max_length, so shorter calls (warm-up, the parity probe) keep max_length, and with it
    the compiled graph's shapes, and stop through this instead."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class HFGenerate:
    """Greedy `generate` with a static cache and, unless mode is off, its compiled decode."""

    def __init__(self, model, mode: str, device: torch.device, max_length: int):
        from transformers import CompileConfig

        self.model = model
        config = copy.deepcopy(model.generation_config)
        config.do_sample = False
        config.eos_token_id = None  # exactly the requested tokens, like every other row
        config.max_length, config.max_new_tokens = max_length, None
        config.cache_implementation = "static"
        config.disable_compile = mode == "off"
        if mode != "off":
            config.compile_config = CompileConfig(
                fullgraph=False, dynamic=False,
                mode="reduce-overhead" if mode == "reduce-overhead" else "default")
            if device.type != "cuda":  # transformers compiles only on accelerators unless told
                config.compile_config._compile_all_devices = True
        self.generation_config = config

    @property
    def module(self):
        return self.model

    def generate_timed(self, ids, output_len: int, stamps, hook):
        """(tokens (B, n), [logits (B, V) per step], BatchTiming) of one `generate` call."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        hook("prefill")
        marks = _Marks(stamps)
        start = stamps.mark()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                  generation_config=self.generation_config,
                                  stopping_criteria=StoppingCriteriaList(
                                      [_StopAt(ids.shape[1] + output_len)]),
                                  logits_processor=LogitsProcessorList([marks]),
                                  output_logits=True, return_dict_in_generate=True)
        end = stamps.mark()
        seconds = stamps.seconds(start, marks.marks + [end])
        tokens = seconds[:-1] or seconds
        tpot = [b - a for a, b in zip(tokens, tokens[1:])]
        timing = BatchTiming(ttft_s=tokens[0], tpot_s=tpot, e2e_s=seconds[-1])
        return out.sequences[:, ids.shape[1]:], list(out.logits), timing
