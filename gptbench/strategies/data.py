"""pure_data_parallel: every rank holds the whole model (DeepSpeed `init_inference`,
tp_size=1) and generates its own disjoint shard of the samples. No collective runs during
generation; ranks meet only at the per-batch barrier and when rank 0 gathers the records.
With `engine.compile` the engine's module runs gptbench's compiled step (gptbench/step.py)
over a static KV cache. `engine.backend: hf_eager` / `hf_compiled` run the plain
Hugging Face model instead (strategies/baselines.py): what a user would run without us.
"""
from __future__ import annotations

from gptbench import dsconfig
from gptbench.strategies import baselines
from gptbench.strategies.base import CachedLM, RankContext


def build(ctx: RankContext):
    import deepspeed

    if ctx.cfg.engine.backend != "deepspeed":
        return baselines.build(ctx)
    ds_config = dsconfig.inference_config(ctx.cfg)
    ctx.info["deepspeed_config"] = ds_config
    engine = deepspeed.init_inference(ctx.model, config={**ds_config, "dtype": ctx.dtype})
    return compiled_or_eager(engine, ctx)


def compiled_or_eager(engine, ctx: RankContext):
    """The engine's generator: eager through the Hugging Face forward with a dynamic cache,
    or gptbench's compiled step over the engine's (sharded) module and a static cache."""
    from gptbench.strategies.base import StepLM

    options = ctx.info.get("inductor")
    if options is None:
        return CachedLM(engine, ctx.model.config)
    w = ctx.cfg.workload
    return StepLM(engine.module, options, w.input_len + w.output_len, ctx.device, ctx.dtype)
