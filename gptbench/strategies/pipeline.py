"""pipeline_data_hybrid and full_model_parallel: GPT-2 as a DeepSpeed `PipelineModule`.

Stages own contiguous layers (embedding, blocks, final norm + LM head); activations flow
stage to stage by p2p send/recv inside `PipelineEngine.eval_batch`, `micro_batches`
micro-batches in flight so stages overlap. PipelineEngine has no KV cache, so each stage
keeps one Hugging Face `DynamicCache` per micro-batch inside its layers; positions travel
with the activations. The last stage picks the greedy tokens and broadcasts them over the
pipe group, so every rank returns them; only the last stage returns logits.
With tp>1 (full_model_parallel) the blocks are first sharded with AutoTP over each
stage's model-parallel group, and the last stage's LM head all-reduces over it too.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from gptbench import dsconfig
from gptbench.strategies.base import RankContext, Step

MB_ID, POS = 1, 2  # positions of the micro-batch id and the positions in the activation tuple


class PipeState:
    """Per-stage state shared by its layers: one KV cache per micro-batch, busy time."""

    def __init__(self, config, device):
        self.config, self.device = config, device
        self.caches: dict[int, object] = {}
        self.profile = False
        self.busy_s = 0.0
        self.input_lens: list[int] = []  # tokens per sequence entering the first stage

    def cache(self, mb: int):
        from transformers import DynamicCache

        if mb not in self.caches:
            self.caches[mb] = DynamicCache(config=self.config)
        return self.caches[mb]

    def timed(self, fn, *args):
        if not self.profile:
            return fn(*args)
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(self.device)
        self.busy_s += time.perf_counter() - t0
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EmbedLayer(nn.Module):
    def __init__(self, wte, wpe, state: PipeState):
        super().__init__()
        self.wte, self.wpe, self.state = wte, wpe, state

    def forward(self, inputs):
        ids, mb, pos = inputs  # (mb, T), (1,), (mb, T)
        self.state.input_lens.append(ids.shape[1])
        hidden = self.state.timed(lambda: self.wte(ids) + self.wpe(pos))  # (mb, T, d)
        return hidden, mb, pos


class BlockLayer(nn.Module):
    def __init__(self, block, state: PipeState):
        super().__init__()
        self.block, self.state = block, state

    def forward(self, inputs):
        hidden, mb, pos = inputs
        cache = self.state.cache(int(mb.item()))
        # attention_mask None: SDPA applies the causal mask itself for T > 1 (no padding).
        hidden = self.state.timed(lambda: self.block(hidden, cache, None, use_cache=True))
        return hidden, mb, pos


class HeadLayer(nn.Module):
    def __init__(self, ln_f, lm_head, state: PipeState):
        super().__init__()
        self.ln_f, self.lm_head, self.state = ln_f, lm_head, state

    def forward(self, inputs):
        hidden, _, _ = inputs
        return self.state.timed(lambda: self.lm_head(self.ln_f(hidden[:, -1:, :]))[:, -1, :])


def _topology(grid, choice: str):
    from deepspeed.runtime.pipe.topology import (PipeDataParallelTopology,
                                                 PipeModelDataParallelTopology)

    if grid.tp > 1 or choice == "PipeModelDataParallelTopology":
        return PipeModelDataParallelTopology(num_pp=grid.pp, num_mp=grid.tp, num_dp=grid.dp)
    return PipeDataParallelTopology(num_pp=grid.pp, num_dp=grid.dp)


def _layer_specs(model, state):
    from deepspeed.pipe import LayerSpec

    t = model.transformer
    return ([LayerSpec(EmbedLayer, t.wte, t.wpe, state)]
            + [LayerSpec(BlockLayer, block, state) for block in t.h]
            + [LayerSpec(HeadLayer, t.ln_f, model.lm_head, state)])


class PipelineGenerator:
    def __init__(self, engine, state: PipeState, micro_batches: int, pipe_group, last_rank):
        self.engine, self.state, self.m = engine, state, micro_batches
        self.pipe_group, self.last_rank = pipe_group, last_rank
        self.pos = None  # (B, 1) next position of each sequence

    @property
    def module(self):
        return self.engine.module

    def _run(self, ids: torch.Tensor, pos: torch.Tensor) -> Step:
        mbs = list(zip(ids.chunk(self.m), pos.chunk(self.m)))
        batches = iter([((x, torch.tensor([i], device=x.device), p), None)
                        for i, (x, p) in enumerate(mbs)])
        self.engine.total_loss = None  # eval_batch accumulates it and never resets it
        out = self.engine.eval_batch(batches, return_logits=False, compute_loss=False,
                                     reduce_output=None, num_micro_batches=self.m)
        logits = torch.cat(out) if self.engine.is_last_stage() else None  # (B, V)
        tokens = (logits.argmax(-1) if logits is not None
                  else torch.empty(ids.shape[0], dtype=torch.long, device=ids.device))
        torch.distributed.broadcast(tokens, src=self.last_rank, group=self.pipe_group)
        self.pos = pos[:, -1:] + 1
        return Step(tokens=tokens, logits=logits, input_len=ids.shape[1])

    def prefill(self, input_ids):
        self.state.caches.clear()
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).expand(b, t)
        return self._run(input_ids, pos)

    def decode(self, tokens):
        return self._run(tokens[:, None], self.pos)


def build(ctx: RankContext) -> PipelineGenerator:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    cfg, grid = ctx.cfg, ctx.grid
    model = ctx.model
    if grid.tp > 1:
        from gptbench.autotp import apply_tp, heads_per_rank

        apply_tp(model, grid.tp, ctx.tp_group, ctx.tp_ranks, ctx.dtype)
        ctx.info["heads_per_tp_rank"] = heads_per_rank(model.config.n_head, grid.tp)
    model.config._attn_implementation = "sdpa"  # see BlockLayer: the causal mask comes from SDPA
    state = PipeState(model.config, ctx.device)
    net = PipelineModule(layers=_layer_specs(model, state), loss_fn=None,
                         topology=_topology(grid, cfg.topology.pipe_topology),
                         dynamic_shape=True,
                         partition_method=cfg.topology.partition_method)
    m = ctx.info["micro_batches"]
    ds_config = dsconfig.pipeline_config(cfg, m)
    ctx.info["deepspeed_config"] = ds_config
    for spec in net._layer_specs:  # drop the other stages' layers: this rank owns its own
        spec.module_args = ()
    engine, *_ = deepspeed.initialize(model=net, config=ds_config)
    engine.eval()
    parts = net.parts  # layer boundaries per stage: stage s owns [parts[s], parts[s+1])
    ctx.info["stage_layers"] = [[int(parts[s]), int(parts[s + 1])] for s in range(grid.pp)]
    ctx.info["pipe_state"] = state
    ctx.info["pipe_topology"] = type(net._topo).__name__
    p, d, t = grid.coords(ctx.rank)
    pipe_ranks = [grid.rank(s, d, t) for s in range(grid.pp)]
    pipe_group = engine.grid.get_pipe_parallel_group()
    return PipelineGenerator(engine, state, m, pipe_group, pipe_ranks[-1])
