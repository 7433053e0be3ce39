"""pure_data_parallel: every rank holds the whole model (DeepSpeed `init_inference`,
tp_size=1) and generates its own disjoint shard of the samples. No collective runs during
generation; ranks meet only at the per-batch barrier and when rank 0 gathers the records.
With `engine.backend: hf_eager` the plain Hugging Face model runs instead: the baseline
that shows what DeepSpeed buys.
"""
from __future__ import annotations

from gptbench.strategies.base import CachedLM, RankContext


def build(ctx: RankContext) -> CachedLM:
    import deepspeed

    eng = ctx.cfg.engine
    if eng.backend == "hf_eager":
        return CachedLM(ctx.model, ctx.model.config)
    engine = deepspeed.init_inference(
        ctx.model, dtype=ctx.dtype, tensor_parallel={"tp_size": 1},
        replace_with_kernel_inject=eng.kernel_inject, enable_cuda_graph=eng.cuda_graph)
    return CachedLM(engine, ctx.model.config)
