"""gptbench's decode step (gptbench/step.py) against the plain Hugging Face model, and what
its compiled graph is: read from inductor's generated code, the KV cache is written in
place (no copy of a cache buffer, no cache among the outputs) and the graph takes only the
step's inputs (tokens, position, caches), the parameters frozen into it. The detector is
shown to see the copies Hugging Face's own static cache makes under the same compiler.
The timing seam: CUDA-event stamps driven by a stand-in event class."""
import copy

import pytest
import torch

from gptbench import compiled, step
from gptbench.runner import generate_batch
from gptbench.strategies.base import StepLM
from gptbench.trackers.timing import Stamps

T, N = 32, 8
CPU = torch.device("cpu")


def reference(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, eos_token_id=None)
    return out[:, ids.shape[1]:]


def ids_for(model, batch=4, seed=3):
    return torch.randint(0, model.config.vocab_size, (batch, T),
                         generator=torch.Generator().manual_seed(seed))


def greedy(fn, roles, caches, ids, n):
    """n tokens through a chain of roles (a pipeline's stages in one process)."""
    for cache in caches:
        cache.reset()
    x, out = ids, []
    for _ in range(n):
        for role, cache in zip(roles, caches):
            x = fn(role, cache, x)
        tokens, _ = x
        out.append(tokens)
        x = tokens[:, None]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("attention", step.ATTENTION)
@torch.no_grad()
def test_eager_step_equals_hugging_face(tiny_model, attention):
    model = tiny_model()
    ids = ids_for(model)
    role = step.Role.whole(model, attention)
    cache = step.KVCache(role, 4, T + N, torch.float32, CPU)
    assert torch.equal(greedy(step.forward, [role], [cache], ids, N), reference(model, ids, N))


@torch.no_grad()
def test_two_stage_roles_compose_to_the_whole_model(tiny_model):
    model = tiny_model()
    t, ids = model.transformer, ids_for(model, seed=4)
    first = step.Role(list(t.h[:1]), 16, wte=t.wte, wpe=t.wpe)
    last = step.Role(list(t.h[1:]), 16, ln_f=t.ln_f, lm_head=model.lm_head)
    caches = [step.KVCache(r, 4, T + N, torch.float32, CPU) for r in (first, last)]
    assert not first.is_last and not last.is_first
    assert torch.equal(greedy(step.forward, [first, last], caches, ids, N),
                       reference(model, ids, N))


@torch.no_grad()
def test_compiled_decode_graph_writes_the_cache_in_place_and_takes_only_its_inputs(tiny_model):
    model = tiny_model()
    ids = ids_for(model, seed=5)
    options = compiled.InductorOptions(mode="default")
    gen = StepLM(model, options, T + N, CPU, torch.float32)
    with compiled.compiling(options), compiled.CapturedCode() as code:
        tokens, _, _ = generate_batch(gen, ids, N)
    assert torch.equal(tokens, reference(model, ids, N))
    graph = compiled.decode_graph(code.codes, T + N)
    layers = model.config.n_layer
    # tokens, position, K and V of every block; the parameters are frozen constants
    assert graph["inputs"] == 2 + 2 * layers
    assert graph["cache_inputs"] == 2 * layers
    assert graph["cache_copies"] == 0 and graph["cache_outputs"] == 0
    assert graph["launches"] > 0
    # the position advanced in place, on the device: prefill T, then N - 1 decodes
    assert int(gen.cache.position) == T + N - 1


@torch.no_grad()
def test_the_detector_sees_hugging_faces_functional_cache_update():
    """The same summary of Hugging Face's forward over its StaticCache, compiled the same
    way: the cache update is functionalised and written back (copies), and the parameters
    are graph inputs. What the step above is proven not to do."""
    from transformers import StaticCache

    from gptbench.models import load_model

    model = load_model("tiny", "random", "tiny", torch.float32, CPU)
    model = copy.deepcopy(model)
    model.transformer.h = model.transformer.h[:1]
    model.config.n_layer = 1
    ids = ids_for(model, seed=6)
    cache = StaticCache(config=model.config, max_cache_len=T + N)
    fn = torch.compile(model.forward, dynamic=False)
    with compiled.compiling(compiled.InductorOptions(mode="default", freezing=False)), \
            compiled.CapturedCode() as code:
        out = fn(input_ids=ids, past_key_values=cache, use_cache=True)
        fn(input_ids=out.logits[:, -1].argmax(-1)[:, None], past_key_values=cache,
           use_cache=True, cache_position=torch.tensor([T]))
    graph = compiled.decode_graph(code.codes, T + N)
    assert graph is not None
    assert graph["cache_copies"] > 0 or graph["cache_outputs"] > 0
    assert graph["inputs"] > 2 + 2 * 1


class FakeEvent:
    """A recorded CUDA event's stand-in: its time is the scripted clock's at record."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, other):  # milliseconds, as torch.cuda.Event
        return (other.t - self.t) * 1e3


class Gen:
    def __init__(self):
        self.calls = 0

    def prefill(self, ids):
        return step_of(ids)

    def decode(self, tokens):
        return step_of(tokens[:, None])


def step_of(ids):
    from gptbench.strategies.base import Step

    return Step(tokens=ids[:, -1], logits=None, input_len=ids.shape[1])


def test_event_stamps_sync_once_per_batch_and_read_the_events():
    times, syncs = iter([0.0, 2.0, 3.0, 5.0, 9.0]), []
    stamps = Stamps(CPU, host=False, event=lambda: FakeEvent(next(times)),
                    sync=lambda: syncs.append(1))
    _, _, timing = generate_batch(Gen(), torch.zeros((2, 3), dtype=torch.long), 4, stamps)
    assert len(syncs) == 1  # after the batch, never inside the loop
    assert timing.ttft_s == 2.0 and timing.tpot_s == [1.0, 2.0, 4.0] and timing.e2e_s == 9.0
    assert stamps.readings == []


def test_host_stamps_keep_every_reading():
    times = iter([10.0, 11.0, 13.0])
    stamps = Stamps(CPU, host=True, clock=lambda: next(times))
    _, _, timing = generate_batch(Gen(), torch.zeros((2, 3), dtype=torch.long), 2, stamps)
    assert stamps.readings == [10.0, 11.0, 13.0]
    assert timing.ttft_s == 1.0 and timing.tpot_s == [2.0]


class OwnLoop:
    """A generator that runs its own loop, marking as the in-flight schedule does: its start,
    each token (on the last stage only), its end."""

    def __init__(self, last_stage: bool):
        self.last_stage = last_stage

    def generate_timed(self, ids, n, stamps, hook):
        from gptbench.runner import BatchTiming

        hook("prefill")
        start = stamps.mark()
        marks = [stamps.mark() for _ in range(n)] if self.last_stage else []
        end = stamps.mark()
        seconds = stamps.seconds(start, marks + [end])
        return ids[:, :n], [None] * n, BatchTiming(seconds[0], [], seconds[-1])


@pytest.mark.parametrize("last_stage", [True, False])
def test_profiled_batch_reads_host_marks_from_every_stage(last_stage):
    """The profiled batch's marks come from host readings on every device (the in-flight
    schedule's CUDA events used to leave them empty: IndexError on CUDA)."""
    from gptbench.measure import batch_marks

    marks, steps = batch_marks(OwnLoop(last_stage), torch.zeros((2, 4), dtype=torch.long), 3, CPU)
    assert len(marks) == 3 and marks[0] <= marks[1] <= marks[2] and steps == 2
