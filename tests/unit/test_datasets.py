"""Prompt files, fixed-shape samples and their JSONL form; a local tokenizer, no hub."""
import json

import pytest
import torch

from gptbench.datasets import load_prompts, load_samples, make_samples, save_samples
from gptbench.errors import UserError

PROMPTS_FILE = "datasets/test_prompts.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over three short prompts, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on mat a dog ran far away birds sing".split()
    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")


PROMPTS = ["the cat sat on the mat", "a dog ran far away", "birds sing"]
# ids: the=2 cat=3 sat=4 on=5 mat=6 a=7 dog=8 ran=9 far=10 away=11 birds=12 sing=13 eos=1
STREAM = [2, 3, 4, 5, 2, 6, 1, 7, 8, 9, 10, 11, 1, 12, 13, 1]  # 16 tokens


def write(tmp_path, text, name="x.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_shipped_prompts():
    prompts = load_prompts(PROMPTS_FILE)
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert all(len(p.split()) >= 15 for p in prompts)


def test_prompt_and_text_keys_and_blank_lines(tmp_path):
    path = write(tmp_path, '{"prompt": "one"}\n\n{"text": "two"}\n')
    assert load_prompts(path) == ["one", "two"]


def test_bad_json_names_file_and_line(tmp_path):
    lines = ['{"prompt": "ok"}'] * 6 + ['{"prompt": "unterminated}'] + ['{"prompt": "ok"}']
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"x\.jsonl:7: not valid JSON"):
        load_prompts(path)


@pytest.mark.parametrize("line", ['{"title": "no prompt"}', '{"prompt": 3}', '{"prompt": " "}',
                                  '["prompt"]'])
def test_missing_prompt_names_line(tmp_path, line):
    path = write(tmp_path, '{"prompt": "a"}\n{"prompt": "b"}\n' + line + "\n")
    with pytest.raises(UserError, match=r"x\.jsonl:3: (missing 'prompt'|expected a JSON object)"):
        load_prompts(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(write(tmp_path, "\n\n"))


def test_synthetic_samples_are_seeded():
    a = make_samples(6, 33, 50257, seed=7)
    assert a.shape == (6, 33) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 50257
    assert torch.equal(a, make_samples(6, 33, 50257, seed=7))
    assert not torch.equal(a, make_samples(6, 33, 50257, seed=8))
    assert len({tuple(row) for row in a.tolist()}) == 6


def test_synthetic_samples_cover_small_vocab():
    ids = make_samples(8, 500, vocab_size=5, seed=0)
    assert set(ids.flatten().tolist()) == {0, 1, 2, 3, 4}


def test_bad_shape_is_user_error():
    with pytest.raises(UserError, match="workload.input_len"):
        make_samples(2, 0, 100, seed=0)


def test_prompt_samples_start_at_each_prompt(tokenizer):
    ids = make_samples(3, 5, vocab_size=14, seed=0, prompts=PROMPTS, tokenizer=tokenizer)
    assert ids.tolist() == [STREAM[0:5], STREAM[7:12], STREAM[13:16] + STREAM[0:2]]


def test_prompt_samples_tile_and_later_rounds_differ(tokenizer):
    ids = make_samples(4, 40, vocab_size=14, seed=0, prompts=PROMPTS, tokenizer=tokenizer)
    assert ids.shape == (4, 40)
    assert ids[0].tolist() == (STREAM * 3)[:40]  # longer than all prompts: tiled
    # Sample 3 reuses prompt 0, moved on by one input_len: 40 % 16 = 8.
    assert ids[3].tolist() == (STREAM * 4)[8:48]
    assert len({tuple(row) for row in ids.tolist()}) == 4


def test_prompt_samples_need_tokenizer_and_fitting_vocab(tokenizer):
    with pytest.raises(UserError, match="tokenizer"):
        make_samples(2, 4, 14, seed=0, prompts=PROMPTS)
    with pytest.raises(UserError, match="vocab_size 10"):
        make_samples(2, 4, 10, seed=0, prompts=PROMPTS, tokenizer=tokenizer)


def test_save_load_roundtrip(tmp_path):
    samples = make_samples(5, 17, 1000, seed=3)
    path = str(tmp_path / "sets" / "bench.jsonl")
    save_samples(path, samples)
    with open(path) as f:
        assert json.loads(f.readline()) == {"input_ids": samples[0].tolist()}
    assert torch.equal(load_samples(path, vocab_size=1000), samples)


@pytest.mark.parametrize("line,message", [
    ('{"input_ids": [1, 2]}', "2 ids, but the first sample has 3"),
    ('{"input_ids": [1, 2, 99]}', "token id 99 is outside"),
    ('{"input_ids": [1, -2, 3]}', "token id -2 is outside"),
    ('{"input_ids": [1, true, 3]}', "missing 'input_ids'"),
    ('{"ids": [1, 2, 3]}', "missing 'input_ids'"),
    ('{"input_ids": [1, 2, 3]', "not valid JSON"),
])
def test_load_samples_errors_name_the_line(tmp_path, line, message):
    path = write(tmp_path, '{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5, 6]}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"x\.jsonl:3: .*{message}"):
        load_samples(path, vocab_size=50)


def test_load_samples_empty(tmp_path):
    with pytest.raises(UserError, match="no samples"):
        load_samples(write(tmp_path, ""))


# ---- `gptbench datasets make`: inputs checked first, one line, exit 2 ----------------------

def make(capsys, *args):
    from gptbench import cli

    code = cli.main(["datasets", "make", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["--prompts", "nope.jsonl"], "--prompts nope.jsonl: file not found"),
    (["--prompts", PROMPTS_FILE, "--tokenizer", "/nonexistent"],
     "--tokenizer /nonexistent: no such directory; pass a local folder"),
    (["--input-len", "5000"], "--input-len 5000 is outside 1..1024, the model's positions"),
    (["--input-len", "2000", "--n-positions", "1500"], "--input-len 2000 is outside 1..1500"),
    (["--num-samples", "0"], "--num-samples must be positive"),
])
def test_make_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "bench.jsonl"
    out.write_text("earlier\n", encoding="utf-8")
    code, _, err = make(capsys, "--out", str(out), *args)
    assert code == 2
    assert err.startswith("gptbench: error: ") and message in err and err.count("\n") == 1
    assert out.read_text(encoding="utf-8") == "earlier\n"  # nothing already written is lost


def test_make_refuses_an_out_that_is_a_directory(tmp_path, capsys):
    code, _, err = make(capsys, "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path} is a directory" in err


def test_a_missing_prompts_file_is_named_before_any_tokenizer_is_looked_for(tmp_path, capsys, monkeypatch):
    def no_tokenizer(name):
        raise AssertionError("the tokenizer was loaded before the prompts were checked")
    monkeypatch.setattr("gptbench.datasets.load_tokenizer", no_tokenizer)
    bad = write(tmp_path, '{"prompt": "ok"}\n{"title": "no prompt"}\n')
    code, _, err = make(capsys, "--out", str(tmp_path / "o.jsonl"), "--prompts", bad)
    assert code == 2 and "x.jsonl:2: missing 'prompt'" in err


def test_a_tokenizer_not_at_hand_is_one_line_saying_how_to_get_it_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the default a user has
    code, _, err = make(capsys, "--out", str(tmp_path / "o.jsonl"), "--prompts", PROMPTS_FILE,
                        "--tokenizer", "gptbench-tests/no-such-tokenizer")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "not found as a local folder or in the local Hugging Face cache" in err
    assert "--tokenizer /models/gpt2" in err and "HF_HUB_OFFLINE=0" in err


def test_make_tiles_prompts_with_a_local_tokenizer_folder(tmp_path, capsys, tokenizer):
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(str(folder))
    out = tmp_path / "sets" / "bench.jsonl"
    code, said, _ = make(capsys, "--out", str(out), "--prompts", PROMPTS_FILE, "--tokenizer", str(folder),
                         "--num-samples", "6", "--input-len", "40")
    assert code == 0 and "6 samples x 40 tokens" in said
    ids = load_samples(str(out), vocab_size=len(tokenizer))
    assert ids.shape == (6, 40)
