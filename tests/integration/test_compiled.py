"""Compiled decode pieces, in one process on the tiny model: effective modes and refusals,
the compiled-step generator and a pipeline stage with one cache per micro-batch, each
against Hugging Face `generate` of the same weights. (Every strategy compiled on real
multi-process runs: test_strategies.py.)"""
import pytest
import torch

from gptbench import compiled
from gptbench.config import load_config
from gptbench.errors import UserError
from gptbench.runplan import resolve
from gptbench.strategies.base import StepLM
from paths import TINY_CPU as TINY

T, N = 32, 8  # tiny-cpu.yaml's input_len and output_len: shapes the demo compiles too


def reference(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, eos_token_id=None)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("requested,device,expected", [
    ("auto", "cuda", "reduce-overhead"), ("auto", "cpu", "off"),
    ("reduce-overhead", "cpu", "default"), ("reduce-overhead", "cuda", "reduce-overhead"),
    ("default", "cpu", "default"), ("off", "cuda", "off")])
def test_effective_mode(requested, device, expected):
    assert compiled.effective_mode(requested, device) == expected


def test_yaml_off_means_off():
    # YAML 1.1 reads a bare `off` as false; --set engine.compile=off must still mean "off"
    assert load_config(TINY, ["engine.compile=off"]).engine.compile == "off"


@pytest.mark.parametrize("sets,expected", [
    (["engine.compile=default"], "default"),
    ([], "off"),  # auto on CPU
    (["engine.backend=hf_compiled"], "default"),  # the backend's name says compiled
    (["engine.backend=hf_eager"], "off"),
])
def test_resolved_compile_mode(sets, expected):
    assert resolve(load_config(TINY, sets), 1).compile_mode == expected


@pytest.mark.parametrize("sets,words", [
    (["engine.backend=hf_eager", "engine.compile=default"], "hf_eager is the eager baseline"),
    (["engine.backend=hf_compiled", "engine.compile=off"], "hf_compiled with engine.compile: off"),
    (["engine.backend=hf_compiled", "strategy=tp"], "only with pure_data_parallel"),
])
def test_contradictions_refused(sets, words):
    with pytest.raises(UserError, match=words):
        resolve(load_config(TINY, sets), 2 if "strategy=tp" in sets else 1)


def test_in_flight_needs_a_micro_batch_per_stage():
    cfg = load_config(TINY, ["strategy=pp", "topology.micro_batches=1"])
    with pytest.raises(UserError, match="micro_batches >= pp: 1 micro-batch"):
        resolve(cfg, 2)
    flush = load_config(TINY, ["strategy=pp", "topology.micro_batches=1",
                               "topology.pipeline_schedule=flush"])
    assert resolve(flush, 2).micro_batches == 1


def test_block_heads_reads_conv1d_and_linear(tiny_model):
    import copy

    from gptbench.autotp import apply_linear_blocks
    from gptbench.step import Role

    model = tiny_model()
    assert Role.whole(model).heads == [5] * 4
    linear = copy.deepcopy(model)
    apply_linear_blocks(linear)  # AutoTP's Linear layout (out, in)
    assert Role.whole(linear).heads == [5] * 4


OPTIONS = compiled.InductorOptions(mode="default")


@torch.no_grad()
def test_step_lm_compiled_equals_generate(tiny_model):
    from gptbench import runner

    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (4, T), generator=torch.Generator().manual_seed(1))
    ref = reference(model, ids, N)
    gen = StepLM(model, OPTIONS, T + N, torch.device("cpu"), torch.float32)
    with compiled.compiling(OPTIONS):
        for _ in range(2):  # the second batch reuses the cache, its position reset
            tokens, logits, _ = runner.generate_batch(gen, ids, N)
            assert torch.equal(tokens, ref)
    assert len(gen.caches) == 1


@torch.no_grad()
def test_stage_runs_every_micro_batch_over_its_own_cache(tiny_model):
    """One Stage holding every layer, two micro-batches with their own static caches,
    interleaved as the in-flight schedule runs them: each decodes exactly like `generate`
    of its own sequences, a second generation over the same caches too. Each cache has its
    own graphs (prefill and decode): its addresses are guarded, so a graph never reads
    another micro-batch's cache."""
    import copy

    from gptbench.strategies.pipeline import BlockLayer, EmbedLayer, HeadLayer, PipeState, Stage

    model = copy.deepcopy(tiny_model())
    t = model.transformer
    layers = ([EmbedLayer(t.wte, t.wpe)] + [BlockLayer(b, i) for i, b in enumerate(t.h)]
              + [HeadLayer(t.ln_f, model.lm_head)])
    stage = Stage(layers, model.config, PipeState(torch.device("cpu")), torch.device("cpu"),
                  torch.float32, OPTIONS, T + N)
    ids = torch.randint(0, model.config.vocab_size, (4, T), generator=torch.Generator().manual_seed(2))
    ref = reference(model, ids, N)
    chunks = ids.chunk(2)
    before = compiled.snapshot()
    with compiled.compiling(OPTIONS):
        for _ in range(2):  # a second generation over the same caches
            stage.begin(2, 2)
            out = [[] for _ in chunks]
            x = list(chunks)
            for _ in range(N):
                for k in range(2):
                    token, _ = stage.run(x[k], k)
                    out[k].append(token)
                    x[k] = token[:, None]
            assert torch.equal(torch.cat([torch.stack(o, 1) for o in out]), ref)
    stats = compiled.CompileStats.since(before)
    assert stats.graphs == 2 * 2 and stats.graph_breaks == 0
