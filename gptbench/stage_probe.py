"""One pipeline stage on one device, its micro-batches interleaved as the in-flight schedule
runs them: what `make gpu-check` can say about compiled pipeline stages with one GPU.

A compiled stage keeps one static KV cache per micro-batch, each with its own graphs (the
caches' addresses are static and guarded). With CUDA graphs that relies on torch's graph
trees replaying the right graph as the micro-batches alternate; if they re-recorded on
every switch, a step would cost a recording (milliseconds) instead of a replay. This probe holds every layer in one stage (no p2p: one
GPU), runs m micro-batches interleaved eagerly and compiled, and reports the decode step
time of each and whether the tokens agree.
"""
from __future__ import annotations

import time

import torch


def _layers(model):
    from gptbench.strategies.pipeline import BlockLayer, EmbedLayer, HeadLayer

    t = model.transformer
    return ([EmbedLayer(t.wte, t.wpe)] + [BlockLayer(b, i) for i, b in enumerate(t.h)]
            + [HeadLayer(t.ln_f, model.lm_head)])


def _generate(stage, ids, m: int, steps: int, device) -> tuple[torch.Tensor, float]:
    """Greedy tokens (B, steps) and the mean decode step (all m micro-batches) in ms."""
    chunks = ids.chunk(m)
    stage.begin(chunks[0].shape[0], m)
    x, out, times = list(chunks), [[] for _ in chunks], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for k in range(m):
            token, _ = stage.run(x[k], k)
            out[k].append(token)
            x[k] = token[:, None]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    return torch.cat([torch.stack(o, 1) for o in out]), 1e3 * sum(times) / len(times)


@torch.no_grad()
def probe(device: torch.device, dtype: torch.dtype, mode: str, preset: str = "small",
          batch: int = 4, m: int = 2, input_len: int = 64, steps: int = 16) -> dict:
    from gptbench import compiled
    from gptbench.models import load_model
    from gptbench.strategies.pipeline import PipeState, Stage

    model = load_model(preset, "random", preset, dtype, device)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (batch, input_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    out = {"preset": preset, "batch": batch, "micro_batches": m, "input_len": input_len,
           "steps": steps, "mode": mode}
    options = compiled.InductorOptions(mode=mode) if mode != "off" else None
    for name, arm in (("eager", None), ("compiled", options)):
        stage = Stage(_layers(model), model.config, PipeState(device), device, dtype,
                      arm, input_len + steps)
        before = compiled.snapshot()
        with compiled.compiling(arm):
            for _ in range(compiled.WARMUP_CALLS):  # compile, record, replay
                tokens, step_ms = _generate(stage, ids, m, steps, device)
        stats = compiled.CompileStats.since(before)
        with compiled.measuring(arm):
            tokens, step_ms = _generate(stage, ids, m, steps, device)
        out[name] = {"decode_step_ms": step_ms, "graphs": stats.graphs,
                     "graph_breaks": stats.graph_breaks, "compile_s": stats.compile_s}
        out[f"{name}_tokens"] = tokens
    same = out.pop("eager_tokens") == out.pop("compiled_tokens")
    out["token_match_rate"] = same.float().mean().item()
    out["speedup"] = out["eager"]["decode_step_ms"] / out["compiled"]["decode_step_ms"]
    return out
