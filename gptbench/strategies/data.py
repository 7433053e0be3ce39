"""pure_data_parallel: every rank holds the whole model (DeepSpeed `init_inference`,
tp_size=1) and generates its own disjoint shard of the samples. No collective runs during
generation; ranks meet only at the per-batch barrier and when rank 0 gathers the records.
With `engine.backend: hf_eager` the plain Hugging Face model runs instead: the baseline
that shows what DeepSpeed buys.
"""
from __future__ import annotations

from gptbench import dsconfig
from gptbench.strategies.base import CachedLM, RankContext


def build(ctx: RankContext) -> CachedLM:
    import deepspeed

    if ctx.cfg.engine.backend == "hf_eager":
        return CachedLM(ctx.model, ctx.model.config)
    ds_config = dsconfig.inference_config(ctx.cfg)
    ctx.info["deepspeed_config"] = ds_config
    engine = deepspeed.init_inference(ctx.model, config={**ds_config, "dtype": ctx.dtype})
    return CachedLM(engine, ctx.model.config)
