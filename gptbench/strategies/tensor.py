"""tensor_data_hybrid: each replica of `tp` contiguous ranks shards every block with
DeepSpeed AutoTP (attention heads and MLP columns split, `n_head` need not divide by tp)
and all-reduces twice per block per step over its tensor-parallel group; replicas
generate disjoint shards of the samples. Every rank of a replica returns the same tokens.
With `engine.compile` the sharded module is compiled with its all-reduces inside the
graph (torch traces DeepSpeed's collectives), over a static KV cache of this rank's heads.
"""
from __future__ import annotations

from gptbench import dsconfig
from gptbench.autotp import apply_tp, heads_per_rank
from gptbench.strategies.base import RankContext
from gptbench.strategies.data import compiled_or_eager


def build(ctx: RankContext):
    tp = ctx.grid.tp
    ds_config = dsconfig.inference_config(ctx.cfg)
    ctx.info["deepspeed_config"] = ds_config
    engine = apply_tp(ctx.model, tp, ctx.tp_group, ctx.tp_ranks, ctx.dtype, ds_config)
    ctx.info["heads_per_tp_rank"] = heads_per_rank(ctx.model.config.n_head, tp)
    return compiled_or_eager(engine, ctx)
