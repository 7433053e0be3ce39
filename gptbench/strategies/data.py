"""pure_data_parallel: every rank holds the whole model (DeepSpeed `init_inference`,
tp_size=1) and generates its own disjoint shard of the samples. No collective runs during
generation; ranks meet only at the per-batch barrier and when rank 0 gathers the records.
With `engine.compile` the engine's module is compiled (`InferenceEngine.compile`) and
decodes over a static KV cache. `engine.backend: hf_eager` / `hf_compiled` run the plain
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
    """The engine's generator: eager with a dynamic cache, or compiled over a static one."""
    from gptbench.compiled import compile_kwargs
    from gptbench.strategies.base import StaticLM

    mode = ctx.info["compile_mode"]
    if mode == "off":
        return CachedLM(engine, ctx.model.config)
    # DeepSpeed's own entry point: InferenceEngine.compile() compiles engine.module in place
    # (nn.Module.compile) and turns off its NVTX ranges, which would break the graph.
    engine.compile(compile_kwargs=compile_kwargs(mode))
    w = ctx.cfg.workload
    return StaticLM(engine, engine.module, w.input_len + w.output_len, ctx.device, ctx.dtype,
                    cudagraphs=mode == "reduce-overhead")
