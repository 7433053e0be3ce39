"""Timed generation: exact arithmetic on a scripted clock, then real greedy decoding that
equals Hugging Face `generate`, and the parity comparison on hand-made tensors."""
import pytest
import torch

from gptbench import parity, runner
from gptbench.strategies.base import CachedLM, Step
from gptbench.trackers.timing import Stamps

B, V = 2, 16


class Log:
    """One ordered record of every call the runner makes: clock, sync, barrier, hook, model."""

    def __init__(self, times):
        self.events, self.times = [], list(times)

    def clock(self):
        t = self.times.pop(0)
        self.events.append(("clock", t))
        return t

    def sync(self):
        self.events.append(("sync",))

    def barrier(self):
        self.events.append(("barrier",))

    def hook(self, point):
        self.events.append(("hook", point))

    def names(self):
        return [e[0] for e in self.events]


class FakeGen:
    """prefill/decode that count up from the prompt's last id, logits one-hot of the token."""

    def __init__(self, log: Log):
        self.log, self.decode_inputs = log, []

    def _step(self, tokens, input_len):
        return Step(tokens=tokens, logits=torch.nn.functional.one_hot(tokens % V, V).float(),
                    input_len=input_len)

    def prefill(self, ids):
        self.log.events.append(("prefill", int(ids[0, 0])))
        return self._step(ids[:, -1] + 1, ids.shape[1])

    def decode(self, tokens):
        self.log.events.append(("decode",))
        self.decode_inputs.append(tokens.clone())
        return self._step(tokens + 1, 1)


def batch(first_id: int, length: int = 5) -> torch.Tensor:
    return torch.arange(first_id, first_id + B * length).reshape(B, length)


# Scripted clock for 2 iterations x 2 batches, output_len 3 (1 prefill + 2 decodes):
# per iteration: start, then per batch (start, after prefill, after decode 1, after decode 2), end.
TIMES = [0.0,
         1.0, 3.0, 7.0, 15.0,        # ttft 2, tpot 4 and 8, e2e 14
         16.0, 17.0, 19.0, 22.0,     # ttft 1, tpot 2 and 3, e2e 6
         30.0,                       # iteration wall 30
         100.0,
         101.0, 111.0, 112.0, 114.0,  # ttft 10, tpot 1 and 2, e2e 13
         120.0, 125.0, 126.0, 130.0,  # ttft 5, tpot 1 and 4, e2e 10
         150.0]                       # iteration wall 50


def run(warmup=1, times=TIMES, iterations=2, output_len=3):
    log = Log(times)
    gen = FakeGen(log)
    batches = [batch(0), batch(1000)]
    timing = runner.run_timed(gen, batches, output_len=output_len, iterations=iterations,
                              warmup=warmup, barrier=log.barrier, clock=log.clock,
                              sync=log.sync, hook=log.hook)
    return timing, log, gen


def test_timing_arithmetic_is_exact():
    timing, log, _ = run()
    assert log.times == []  # every scripted time consumed, none more
    assert [(b.ttft_s, b.tpot_s, b.e2e_s) for b in timing.batches] == [
        (2.0, [4.0, 8.0], 14.0), (1.0, [2.0, 3.0], 6.0),
        (10.0, [1.0, 2.0], 13.0), (5.0, [1.0, 4.0], 10.0)]
    assert timing.iteration_wall_s == [30.0, 50.0]
    assert timing.iteration_tokens == [2 * B * 3, 2 * B * 3]
    assert timing.timed_wall_s == 80.0
    assert timing.generated_tokens == 24
    assert timing.decode_input_lens == {1}


def test_e2e_is_ttft_plus_every_tpot():
    timing, _, _ = run()
    for b in timing.batches:
        assert b.e2e_s == b.ttft_s + sum(b.tpot_s)


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_warmup_is_untimed(warmup):
    timing, log, _ = run(warmup=warmup)
    first_barrier = log.names().index("barrier")
    before = log.events[:first_barrier]
    # warm-up runs whole batches (cycling through them) without the clock, sync or hooks
    assert [e for e in before if e[0] == "prefill"] == [("prefill", (0, 1000)[i % 2])
                                                        for i in range(warmup)]
    assert [e[0] for e in before] == ["prefill", "decode", "decode"] * warmup
    # the scripted times land on the timed batches only, as without warm-up
    assert log.times == []
    assert [b.ttft_s for b in timing.batches] == [2.0, 1.0, 10.0, 5.0]
    assert timing.iteration_wall_s == [30.0, 50.0] and timing.iteration_tokens == [12, 12]


def test_barrier_once_per_iteration_and_once_per_batch():
    _, log, _ = run()
    assert log.names().count("barrier") == 2 * (1 + 2)


def test_call_order_syncs_around_every_timed_region():
    _, log, _ = run(warmup=0)
    decode = ["hook", "decode", "sync", "clock"]
    one_batch = ["barrier", "hook", "sync", "clock", "prefill", "sync", "clock"] + decode * 2
    iteration = ["barrier", "sync", "clock"] + one_batch * 2 + ["sync", "clock"]
    assert log.names() == iteration * 2
    # every clock reading directly follows a sync: the device is idle when time is read
    assert all(log.events[i - 1] == ("sync",) for i, n in enumerate(log.names()) if n == "clock")
    assert [e[1] for e in log.events if e[0] == "hook"] == ["prefill", "decode", "decode"] * 4


@pytest.mark.parametrize("output_len", [1, 2, 5])
def test_exactly_output_len_tokens_one_prefill_then_single_token_decodes(output_len):
    log = Log(range(100))
    gen = FakeGen(log)
    ids = batch(7)
    stamps = Stamps(torch.device("cpu"), clock=log.clock, sync=log.sync)
    tokens, logits, bt = runner.generate_batch(gen, ids, output_len, stamps)
    assert tokens.shape == (B, output_len)
    assert log.names().count("prefill") == 1 and log.names().count("decode") == output_len - 1
    # each decode is fed only the previous step's tokens: one per sequence
    want = ids[:, -1:] + 1 + torch.arange(output_len)  # (B, output_len)
    assert torch.equal(tokens, want)
    assert all(t.shape == (B,) for t in gen.decode_inputs)
    assert [t.tolist() for t in gen.decode_inputs] == [want[:, i].tolist()
                                                       for i in range(output_len - 1)]
    assert len(logits) == output_len and len(bt.tpot_s) == output_len - 1
    if output_len == 1:
        assert bt.e2e_s == bt.ttft_s


# ---- real one-rank generation -----------------------------------------------------------

PROBE = dict(batch=3, input_len=12, seed=1, n=8)  # row 0 meets EOS as its 5th greedy token


def probe(model):
    g = torch.Generator().manual_seed(PROBE["seed"])
    return torch.randint(0, model.config.vocab_size, (PROBE["batch"], PROBE["input_len"]),
                         generator=g)


@pytest.mark.parametrize("tie", [True, False])
def test_cached_lm_equals_hugging_face_greedy_generate(tiny_model, tie):
    """Exactly n argmax tokens, EOS an ordinary token: `generate` with stopping turned off.

    (`min_new_tokens=n` would not do: it masks EOS to -inf, which plain argmax never does.)
    """
    model = tiny_model(tie)
    assert model.config.tie_word_embeddings is tie
    ids, n = probe(model), PROBE["n"]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
        lens = set()
        tokens, logits, _ = runner.generate_batch(CachedLM(model, model.config), ids, n,
                                                  decode_input_lens=lens)
    ref_tokens = ref.sequences[:, ids.shape[1]:]
    assert ref_tokens.shape == (3, n)
    assert torch.equal(tokens, ref_tokens)
    assert len(logits) == len(ref.logits) == n
    for step, (mine, theirs) in enumerate(zip(logits, ref.logits)):
        assert (mine - theirs).abs().max().item() < 1e-5, step
    assert lens == {1}
    assert tokens.unique().numel() > 1  # not a degenerate repeat of one token


def test_parity_reference_equals_the_runner_when_eos_is_the_argmax(tiny_model):
    """The parity reference must be the same greedy decoding the strategies run, also when
    a sequence's argmax is EOS (pretrained GPT-2 emits 50256 after a finished text)."""
    model = tiny_model(True)
    ids, n = probe(model), PROBE["n"]
    with torch.no_grad():
        tokens, logits, _ = runner.generate_batch(CachedLM(model, model.config), ids, n)
        ref_tokens, ref_logits = parity.reference(model, ids, n)
    assert (tokens == model.config.eos_token_id).any()  # the case this test is about
    assert torch.equal(ref_tokens, tokens)
    p = parity.compare(ref_tokens, ref_logits, tokens, logits, torch.float32)
    assert p["passed"] and p["tokens_match"] and p["max_abs_logit_diff"] < 1e-5


def test_cached_lm_reuses_its_cache_and_prefill_resets_it(tiny_model):
    model = tiny_model(True)
    gen = CachedLM(model, model.config)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g)
    with torch.no_grad():
        first = gen.prefill(ids)
        assert first.input_len == 10 and gen.cache.get_seq_length() == 10
        step = gen.decode(first.tokens)
        assert step.input_len == 1 and gen.cache.get_seq_length() == 11
        again = gen.prefill(ids)  # a new batch: fresh cache, same answer
        assert gen.cache.get_seq_length() == 10
        assert torch.equal(again.tokens, first.tokens)
        full = model(torch.cat([ids, first.tokens[:, None]], dim=1)).logits[:, -1]
    assert (step.logits - full).abs().max().item() < 1e-5


# ---- parity.compare ---------------------------------------------------------------------

def hand_made(n=4, b=2, v=8):
    g = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(n, b, v, generator=g)          # (n, B, V)
    ref_tokens = ref_logits.argmax(-1).t().contiguous()    # (B, n)
    return ref_tokens, ref_logits, ref_tokens.clone(), [ref_logits[i].clone() for i in range(n)]


def test_identical_passes():
    rt, rl, t, lg = hand_made()
    p = parity.compare(rt, rl, t, lg, torch.float32)
    assert p["passed"] and p["tokens_match"]
    assert p["token_match_rate"] == 1.0 and p["max_abs_logit_diff"] == 0.0
    assert (p["samples"], p["tokens"]) == (2, 4)
    assert p["tolerance_relative"] == parity.REL_TOLERANCE[torch.float32]


def test_flipped_token_fails_in_fp32_with_exact_rate():
    rt, rl, t, lg = hand_made()
    t[1, 2] = (t[1, 2] + 1) % 8
    p = parity.compare(rt, rl, t, lg, torch.float32)
    assert not p["tokens_match"] and not p["passed"]
    assert p["token_match_rate"] == 7 / 8
    assert p["max_abs_logit_diff"] == 0.0


def test_flipped_clear_winner_fails_in_bf16_too():
    # Near-ties within rounding pass in bf16 (tests/unit/test_parity.py); a token whose
    # reference logit trails the top one by far more than the tolerance is a real mismatch.
    rt, rl, t, lg = hand_made()
    t[0, 3] = (t[0, 3] + 1) % 8
    p = parity.compare(rt, rl, t, lg, torch.bfloat16)
    gap = (rl[3, 0].max() - rl[3, 0, t[0, 3]]).item()
    assert gap > p["tolerance"]
    assert not p["tokens_match"] and not p["passed"] and p["real_mismatches"] == 1
    assert p["token_match_rate"] == 7 / 8


def test_logit_diff_beyond_tolerance_fails():
    rt, rl, t, lg = hand_made()
    lg[1] = lg[1] + torch.tensor([0.0] * 7 + [1e-3])
    p = parity.compare(rt, rl, t, lg, torch.float32)  # 1e-5 of max |logit| (~2)
    assert p["tokens_match"] and not p["passed"]
    assert p["max_abs_logit_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert parity.compare(rt, rl, t, lg, torch.float32, tolerance=1e-2)["passed"]


def test_logits_compared_only_while_tokens_agree():
    rt, rl, t, lg = hand_made()
    t[0, 1] = (t[0, 1] + 1) % 8         # sequence 0 parts at step 1
    lg[1] = lg[1] + 0.5                 # step 1 still had the same inputs: compared
    lg[2][0] += 100.0                   # after its split sequence 0's inputs differ:
    lg[3][0] -= 100.0                   # not compared
    # tolerance: 2 x max |logit| (>= any gap), so the parting token is within rounding
    p = parity.compare(rt, rl, t, lg, torch.bfloat16, tolerance=2.0)
    assert p["max_abs_logit_diff"] == pytest.approx(0.5, abs=1e-6)
    assert p["passed"] and p["within_rounding"] == 1
    lg[3][1] += 2.0                     # sequence 1 never parted: still compared
    assert parity.compare(rt, rl, t, lg, torch.bfloat16, tolerance=2.0)["max_abs_logit_diff"] \
        == pytest.approx(2.0, abs=1e-6)


def test_rank_without_logits_judged_on_tokens():
    rt, rl, t, _ = hand_made()
    p = parity.compare(rt, rl, t, [None] * 4, torch.float32)
    assert p["max_abs_logit_diff"] is None and p["passed"]
