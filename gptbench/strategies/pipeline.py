"""pipeline_data_hybrid and full_model_parallel: GPT-2 as a DeepSpeed `PipelineModule`.

Stages own contiguous layers ([embedding, blocks..., final norm + LM head], partitioned by
DeepSpeed over what each rank really holds); each stage keeps one KV cache per micro-batch
(static when compiled) and runs its layers as one function (`Stage`, compiled as one graph
per shape). Two schedules over the same partition, topology and process groups:

- `in_flight` (default): micro-batch k's next token, picked on the last stage, goes back to
  the first stage by p2p, which starts k's next step while the other micro-batches are still
  in later stages: the pipeline fills and drains once per generation (bubble ~
  (p-1)/(N*m+p-1) for N tokens). Non-blocking sends, no barrier, no host sync in the loop
  (timed like every generator: on CUDA events read after the batch). The last stage
  broadcasts the
  batch's tokens over the pipe group once at the end, so every rank returns them.
- `flush`: one `PipelineEngine.eval_batch` per token (DeepSpeed's schedule: fill, drain and
  a global barrier every token; bubble (p-1)/(m+p-1)); the last stage broadcasts each
  step's tokens over the pipe group. Kept as the reference.

With tp>1 (full_model_parallel) the blocks are first sharded with AutoTP over each stage's
model-parallel group; every tensor rank of a stage runs the same schedule and exchanges
activations with its peer (same tensor rank) in the neighbouring stages.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from gptbench import dsconfig
from gptbench.runner import BatchTiming
from gptbench.strategies.base import RankContext, Step


class PipeState:
    """Per-stage profiling of one profiled batch: compute (busy) and receive (blocked) time."""

    def __init__(self, device):
        self.device = device
        self.profile = False
        self.busy_s = 0.0
        self.recv_s = 0.0

    def timed(self, fn, *args):
        """fn(*args), its device time added to busy_s while profiling."""
        if not self.profile:
            return fn(*args)
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(self.device)
        self.busy_s += time.perf_counter() - t0
        return out

    def recv(self, buf, src: int):
        """A blocking receive into `buf`, its wait added to recv_s while profiling."""
        t0 = time.perf_counter() if self.profile else None
        torch.distributed.recv(buf, src=src)
        if t0 is not None:
            _sync(self.device)
            self.recv_s += time.perf_counter() - t0
        return buf


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The PipelineModule's layers: thin holders of the Hugging Face modules, partitioned by
# DeepSpeed. A rank runs its own through `Stage`, never one by one.
class EmbedLayer(nn.Module):
    def __init__(self, wte, wpe):
        super().__init__()
        self.wte, self.wpe = wte, wpe


class BlockLayer(nn.Module):
    def __init__(self, block, index: int):
        super().__init__()
        self.block, self.index = block, index


class HeadLayer(nn.Module):
    def __init__(self, ln_f, lm_head):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head


class Stage:
    """This rank's layers as one function of (input, micro-batch), one KV cache each.

    Input: token ids (mb, T) on the first stage, hidden states (mb, T, d) elsewhere.
    Output: hidden states, or on the last stage (tokens (mb,), last-position logits (mb, V)).
    Compiled (`options`): gptbench's step (gptbench/step.py) over static caches, one graph
    per shape and cache. Eager: the Hugging Face blocks over their dynamic cache."""

    def __init__(self, layers, config, state: PipeState, device, dtype, options, max_len: int):
        from gptbench import step

        embed = next((l for l in layers if isinstance(l, EmbedLayer)), None)
        self.blocks = [l for l in layers if isinstance(l, BlockLayer)]
        head = next((l for l in layers if isinstance(l, HeadLayer)), None)
        self.config, self.state, self.options = config, state, options
        self.device, self.dtype, self.max_len = device, dtype, max_len
        self.role = step.Role(
            [l.block for l in self.blocks], config.n_embd // config.n_head,
            wte=embed.wte if embed else None, wpe=embed.wpe if embed else None,
            ln_f=head.ln_f if head else None, lm_head=head.lm_head if head else None,
            attention=options.attention if options else "math")
        self.fn = options.compile(step.forward) if options else self.hf_forward
        self.caches: dict[int, list] = {}  # micro-batch size -> one cache per micro-batch
        self.active: list = []

    @property
    def compiled(self) -> bool:
        return self.options is not None

    def begin(self, mb_size: int, m: int) -> None:
        """A new generation of m micro-batches of mb_size sequences: empty caches."""
        from gptbench.step import KVCache

        if not self.compiled:  # eager: Hugging Face's dynamic cache, grown as it goes
            self.active = [_HFCache(self.config, self.device) for _ in range(m)]
            return
        if len(self.caches.get(mb_size, [])) < m:
            self.caches[mb_size] = [KVCache(self.role, mb_size, self.max_len, self.dtype,
                                            self.device) for _ in range(m)]
        self.active = self.caches[mb_size][:m]
        for cache in self.active:
            cache.reset()

    def precompile(self, mb_size: int, m: int, input_len: int, n_embd: int) -> None:
        """Compile (and on CUDA record) every shape on this stage alone, on dummy inputs:
        otherwise a stage compiles only when its first real input arrives, after the
        previous stage's compilation, and waits for it inside a receive."""
        from gptbench.compiled import WARMUP_CALLS

        def dummy(length):
            if self.role.is_first:
                return torch.zeros((mb_size, length), dtype=torch.long, device=self.device)
            return torch.zeros((mb_size, length, n_embd), dtype=self.dtype, device=self.device)

        for _ in range(WARMUP_CALLS):
            self.begin(mb_size, m)
            for k in range(m):
                self.run(dummy(input_len), k)
                self.run(dummy(1), k)

    def run(self, x: torch.Tensor, k: int):
        cache = self.active[k]
        if not (self.compiled and self.options.cudagraphs):
            return self.state.timed(self.fn, self.role, cache, x)
        from gptbench.compiled import mark_step

        def replay():  # the graph's output buffers are rewritten by the next replay
            mark_step()
            out = self.fn(self.role, cache, x)
            return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

        return self.state.timed(replay)

    def hf_forward(self, role, cache, x):
        """The eager path: Hugging Face's blocks, masks and dynamic cache."""
        from transformers.masking_utils import create_causal_mask

        length = x.shape[1]
        pos = torch.arange(length, device=x.device) + cache.position  # (T,)
        cache.position += length
        if role.is_first:
            x = role.wte(x) + role.wpe(pos)  # (mb, T, d)
        if self.blocks:
            # Sized against this stage's first block: its cache layer knows how far we are.
            mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None,
                                      cache=cache.cache, position_ids=pos[None],
                                      layer_idx=self.blocks[0].index)
            for layer in self.blocks:
                x = layer.block(x, cache.cache, mask, use_cache=True, position_ids=pos[None])
        if not role.is_last:
            return x
        logits = role.lm_head(role.ln_f(x[:, -1:, :]))[:, -1, :]  # (mb, V)
        return logits.argmax(dim=-1), logits


class _HFCache:
    """A micro-batch's dynamic cache and next position, for the eager path."""

    def __init__(self, config, device):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=config)
        self.position = 0


class _Peers:
    """This rank's neighbours in its pipe (same replica, same tensor rank)."""

    def __init__(self, grid, rank: int, pipe_group):
        p, d, t = grid.coords(rank)
        self.stage, self.stages = p, grid.pp
        self.prev = grid.rank(p - 1, d, t) if p > 0 else None
        self.next = grid.rank(p + 1, d, t) if p < grid.pp - 1 else None
        self.first, self.last = grid.rank(0, d, t), grid.rank(grid.pp - 1, d, t)
        self.group = pipe_group

    @property
    def is_first(self):
        return self.prev is None

    @property
    def is_last(self):
        return self.next is None


class InFlightGenerator:
    """The in-flight schedule; `generate_timed` runs a whole batch (runner.generate_batch)."""

    def __init__(self, engine, stage: Stage, peers: _Peers, m: int, n_embd: int):
        self.engine, self.stage, self.peers, self.m, self.n_embd = engine, stage, peers, m, n_embd

    @property
    def module(self):
        return self.engine.module

    def precompile(self, ids: torch.Tensor) -> None:
        if self.stage.compiled:
            self.stage.precompile(ids.shape[0] // self.m, self.m, ids.shape[1], self.n_embd)

    def _recv_hidden(self, mb: int, length: int):
        buf = torch.empty((mb, length, self.n_embd), dtype=self.stage.dtype,
                          device=self.stage.device)
        return self.stage.state.recv(buf, self.peers.prev)

    def _recv_tokens(self, mb: int):
        buf = torch.empty((mb,), dtype=torch.long, device=self.stage.device)
        return self.stage.state.recv(buf, self.peers.last)

    def generate_timed(self, ids, output_len: int, stamps, hook):
        peers, m = self.peers, self.m
        b, length = ids.shape
        mb = b // m
        chunks = ids.chunk(m)  # (mb, T) each; only the first stage reads them
        self.stage.begin(mb, m)
        sends, marks = [], [[] for _ in range(m)]
        tokens = [[] for _ in range(m)]
        logits = [[None] * m for _ in range(output_len)]
        hook("prefill")
        start = stamps.mark()
        for step in range(output_len):
            if step == 1:
                hook("decode")
            for k in range(m):
                if peers.is_first:
                    x = chunks[k] if step == 0 else self._recv_tokens(mb)[:, None]
                else:
                    x = self._recv_hidden(mb, length if step == 0 else 1)
                y = self.stage.run(x, k)
                if not peers.is_last:
                    sends.append(torch.distributed.isend(y, peers.next))
                    continue
                token, logits[step][k] = y  # (mb,), (mb, V)
                marks[k].append(stamps.mark())
                tokens[k].append(token)
                if step < output_len - 1:
                    sends.append(torch.distributed.isend(token, peers.first))
        for work in sends:
            work.wait()
        out = (torch.cat([torch.stack(t, dim=1) for t in tokens]) if peers.is_last
               else torch.empty((b, output_len), dtype=torch.long, device=ids.device))
        torch.distributed.broadcast(out, src=peers.last, group=peers.group)  # (B, n)
        end = stamps.mark()
        return out, self._logits(logits), self._timing(stamps, start, marks, end)

    def _logits(self, logits):
        if not self.peers.is_last:
            return [None] * len(logits)
        return [torch.cat(row) for row in logits]  # (B, V) per step

    def _timing(self, stamps, start, marks, end) -> BatchTiming:
        if not self.peers.is_last:  # no token appears here: only this rank's wall time
            wall = stamps.seconds(start, [end])[0]
            return BatchTiming(ttft_s=wall, tpot_s=[], e2e_s=wall)
        # per micro-batch: when each of its tokens appeared
        seconds = [stamps.seconds(start, row) for row in marks]
        ttft = [row[0] for row in seconds]
        tpot = [b - a for row in seconds for a, b in zip(row, row[1:])]
        return BatchTiming(ttft_s=ttft[0], tpot_s=tpot, e2e_s=max(row[-1] for row in seconds),
                           ttft_groups_s=ttft)


class FlushGenerator:
    """DeepSpeed's schedule: one `eval_batch` per token over the stage function."""

    def __init__(self, engine, stage: Stage, peers: _Peers, m: int, n_embd: int):
        self.engine, self.stage, self.peers, self.m, self.n_embd = engine, stage, peers, m, n_embd
        self.next_k = 0
        engine.module.forward_funcs = [self._stage_call]  # PipelineModule runs exactly this

    def precompile(self, ids: torch.Tensor) -> None:
        if self.stage.compiled:
            self.stage.precompile(ids.shape[0] // self.m, self.m, ids.shape[1], self.n_embd)

    @property
    def module(self):
        return self.engine.module

    def _stage_call(self, x):
        k, self.next_k = self.next_k, self.next_k + 1  # eval_batch runs micro-batches in order
        # PipelineEngine marks received activations as requiring grad (it was made for
        # training): detached, they match what the stage was compiled for.
        out = self.stage.run(x.detach(), k)
        return out[1] if isinstance(out, tuple) else out  # the last stage's logits

    def _run(self, ids: torch.Tensor) -> Step:
        self.next_k = 0
        batches = iter([(x, None) for x in ids.chunk(self.m)])
        self.engine.total_loss = None  # eval_batch accumulates it and never resets it
        out = self.engine.eval_batch(batches, return_logits=False, compute_loss=False,
                                     reduce_output=None, num_micro_batches=self.m)
        logits = torch.cat(out) if self.peers.is_last else None  # (B, V)
        tokens = (logits.argmax(-1) if logits is not None
                  else torch.empty(ids.shape[0], dtype=torch.long, device=ids.device))
        torch.distributed.broadcast(tokens, src=self.peers.last, group=self.peers.group)
        return Step(tokens=tokens, logits=logits, input_len=ids.shape[1])

    def prefill(self, input_ids):
        self.stage.begin(input_ids.shape[0] // self.m, self.m)
        return self._run(input_ids)

    def decode(self, tokens):
        return self._run(tokens[:, None])


def _topology(grid, choice: str):
    from deepspeed.runtime.pipe.topology import (
        PipeDataParallelTopology,
        PipeModelDataParallelTopology,
    )

    if grid.tp > 1 or choice == "PipeModelDataParallelTopology":
        return PipeModelDataParallelTopology(num_pp=grid.pp, num_mp=grid.tp, num_dp=grid.dp)
    return PipeDataParallelTopology(num_pp=grid.pp, num_dp=grid.dp)


def _layer_specs(model):
    from deepspeed.pipe import LayerSpec

    t = model.transformer
    return ([LayerSpec(EmbedLayer, t.wte, t.wpe)]
            + [LayerSpec(BlockLayer, block, i) for i, block in enumerate(t.h)]
            + [LayerSpec(HeadLayer, t.ln_f, model.lm_head)])


def partition_module(model, grid, cfg):
    """The PipelineModule over what each rank really holds.

    DeepSpeed's `partition_method: parameters` counts only parameters that require grad, and
    AutoTP marks the weights it shards as not requiring grad: counted as they are, a sharded
    GPT-2 XL splits as [embedding] | [48 blocks + head]. So every weight is counted while the
    partition is made (this rank's sharded sizes), then frozen again: inference only."""
    from deepspeed.pipe import PipelineModule

    params = list(model.parameters())
    frozen = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        return PipelineModule(layers=_layer_specs(model), loss_fn=None,
                              topology=_topology(grid, cfg.topology.pipe_topology),
                              dynamic_shape=True,
                              partition_method=cfg.topology.partition_method)
    finally:
        for p, flag in zip(params, frozen):
            p.requires_grad_(flag)


def build(ctx: RankContext):
    import deepspeed

    cfg, grid, model = ctx.cfg, ctx.grid, ctx.model
    if grid.tp > 1:
        from gptbench.autotp import apply_tp, heads_per_rank

        apply_tp(model, grid.tp, ctx.tp_group, ctx.tp_ranks, ctx.dtype)
        ctx.info["heads_per_tp_rank"] = heads_per_rank(model.config.n_head, grid.tp)
    model.config._attn_implementation = "sdpa"
    net = partition_module(model, grid, cfg)
    m = ctx.info["micro_batches"]
    ds_config = dsconfig.pipeline_config(cfg, m)
    ctx.info["deepspeed_config"] = ds_config
    for spec in net._layer_specs:  # drop the other stages' layers: this rank owns its own
        spec.module_args = ()
    engine, *_ = deepspeed.initialize(model=net, config=ds_config)
    engine.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    parts = net.parts  # layer boundaries per stage: stage s owns [parts[s], parts[s+1])
    ctx.info["stage_layers"] = [[int(parts[s]), int(parts[s + 1])] for s in range(grid.pp)]
    ctx.info["pipe_topology"] = type(net._topo).__name__
    ctx.info["pipeline_schedule"] = cfg.topology.pipeline_schedule
    state = PipeState(ctx.device)
    ctx.info["pipe_state"] = state
    w = cfg.workload
    stage = Stage(net.forward_funcs, model.config, state, ctx.device, ctx.dtype,
                  ctx.info.get("inductor"), w.input_len + w.output_len)
    peers = _Peers(grid, ctx.rank, engine.grid.get_pipe_parallel_group())
    if cfg.topology.pipeline_schedule == "flush":
        return FlushGenerator(engine, stage, peers, m, model.config.n_embd)
    return InFlightGenerator(engine, stage, peers, m, model.config.n_embd)
