"""Benchmark inputs: prompt files, fixed-shape token samples, and their JSONL form.

Every sample is exactly `input_len` tokens, never padded: padding would change the work
per sequence and break the bytes-per-step arithmetic. Generation cost does not depend on
which tokens are fed, so seeded random ids are the default; real prompts are tiled to the
same shape when a tokenizer is at hand.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from gptbench import limits
from gptbench.errors import UserError

if TYPE_CHECKING:  # annotations only: the functions import torch, so this module loads without it
    import torch

PROMPT_KEYS = ("prompt", "text")


def _jsonl_objects(path: str):
    """(line number, object) of each non-blank line; UserError naming path:line if bad."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    text = limits.read_text(path, "dataset")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # an int of > 4300 digits; deep nesting
            raise UserError(f"{path}:{lineno}: not valid JSON "
                            f"({(str(e) or type(e).__name__).splitlines()[0][:100]})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, "
                            f"got {type(obj).__name__}")
        yield lineno, obj


def load_prompts(path: str) -> list[str]:
    """The prompts of a JSONL file, one {"prompt": "..."} (or {"text": "..."}) per line."""
    prompts = []
    for lineno, obj in _jsonl_objects(path):
        text = next((obj[k] for k in PROMPT_KEYS if k in obj), None)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{lineno}: missing 'prompt' (a non-empty string)")
        prompts.append(text)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _check_shape(num_samples: int, input_len: int, vocab_size: int) -> None:
    for key, value in (("workload.num_samples", num_samples),
                       ("workload.input_len", input_len), ("model.vocab_size", vocab_size)):
        if value < 1:
            raise UserError(f"{key}: must be positive, got {value}")


def _token_stream(prompts: list[str], tokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
    """All prompts' ids, each followed by eos (so wrap-around also starts a new document),
    and the offset where each prompt starts."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos token to separate prompts")
    stream, starts = [], []
    for prompt in prompts:
        starts.append(len(stream))
        stream += tokenizer.encode(prompt, add_special_tokens=False) + [eos]
    too_big = max(stream)
    if too_big >= vocab_size:
        raise UserError(f"prompt token id {too_big} is outside the model's vocab_size "
                        f"{vocab_size}: use synthetic samples or a model with this tokenizer")
    return stream, starts


def make_samples(num_samples: int, input_len: int, vocab_size: int, seed: int,
                 prompts: list[str] | None = None, tokenizer=None) -> torch.Tensor:
    """(num_samples, input_len) int64 token ids.

    Without prompts: uniform in [0, vocab_size) from a generator seeded with `seed`.
    With prompts (and their tokenizer): the eos-separated token stream of all prompts,
    read cyclically; sample i starts where prompt i mod P starts, moved on by
    (i div P) * input_len tokens for later rounds, so samples differ. `seed` is unused.
    """
    import torch

    _check_shape(num_samples, input_len, vocab_size)
    if prompts is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_samples, input_len), generator=generator)
    if tokenizer is None:
        raise UserError("prompts need a tokenizer to become token ids")
    stream, starts = _token_stream(prompts, tokenizer, vocab_size)
    ids = torch.tensor(stream, dtype=torch.long)  # (S,)
    offsets = torch.tensor([starts[i % len(prompts)] + (i // len(prompts)) * input_len
                            for i in range(num_samples)])  # (N,)
    positions = (offsets[:, None] + torch.arange(input_len)[None, :]) % len(stream)  # (N, T)
    return ids[positions]


def save_samples(path: str, samples: torch.Tensor) -> None:
    """One {"input_ids": [...]} line per row of the (N, T) `samples`, written atomically: an
    interrupted write leaves the earlier file as it was."""
    from gptbench.results import write_atomic

    if samples.dim() != 2:
        raise ValueError(f"samples must be (num_samples, input_len), got {tuple(samples.shape)}")
    text = "".join(json.dumps({"input_ids": row}) + "\n" for row in samples.tolist())
    write_atomic(path, text.encode("utf-8"))


# ---- `gptbench datasets make`: inputs checked before any work ------------------------------

GPT2_POSITIONS = 1024
OFFLINE_HINT = ("pass a local folder holding the tokenizer (tokenizer.json, or vocab.json and "
                "merges.txt), e.g. --tokenizer /models/gpt2, or fetch it once into the Hugging "
                "Face cache on a machine with network (huggingface-cli download gpt2); set "
                "HF_HUB_OFFLINE=0 to let this command download it")


def check_make_inputs(out: str, num_samples: int, input_len: int, n_positions: int,
                      prompts: str | None, tokenizer: str | None) -> None:
    """Cheapest checks first, so a mistake costs no tokenizer load and no hub wait."""
    if prompts is not None:
        if not os.path.isfile(prompts):
            raise UserError(f"--prompts {prompts}: file not found")
        if not os.access(prompts, os.R_OK):
            raise UserError(f"--prompts {prompts}: not readable")
    limits.check_path("--out", out)
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a directory; name the file to write, e.g. "
                        f"{os.path.join(out, 'bench.jsonl')}")
    if os.path.lexists(out) and not os.path.isfile(out):
        raise UserError(f"--out {out}: exists and is not a regular file")
    problem = limits.writable_folder_problem(os.path.dirname(os.path.abspath(out)))
    if problem:  # probed as `run` probes output_dir: access() says yes to root in /proc
        raise UserError(f"--out {out}: cannot create a file there: {problem}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be positive, got {num_samples}")
    limits.check_int("--num-samples", num_samples, 1, limits.MAX_COUNT)
    limits.check_int("--n-positions", n_positions, 1, limits.MAX_LEN)
    if not 1 <= input_len <= n_positions:
        raise UserError(f"--input-len {input_len} is outside 1..{n_positions}, the model's "
                        f"positions (--n-positions; GPT-2 has {GPT2_POSITIONS})")
    if num_samples * input_len > limits.MAX_TOKENS_PER_REPLICA:
        raise UserError(f"--num-samples x --input-len = {num_samples * input_len:,} tokens, "
                        f"more than {limits.MAX_TOKENS_PER_REPLICA:,} (2 GiB of token ids)")
    if prompts is not None and _looks_like_path(tokenizer) and not os.path.isdir(os.path.expanduser(tokenizer)):
        raise UserError(f"--tokenizer {tokenizer}: no such directory; {OFFLINE_HINT}")


def _looks_like_path(name: str) -> bool:
    """A folder rather than a hub name ("openai-community/gpt2" also holds a slash)."""
    return name.startswith(("/", "./", "../", "~"))


def load_tokenizer(name: str):
    """A tokenizer from a local folder or the local Hugging Face cache; the hub only when
    HF_HUB_OFFLINE=0 says so (else a missing tokenizer costs ~48 s of silent retries)."""
    from transformers import AutoTokenizer

    download = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no")
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name), local_files_only=not download)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, hub errors
        if download:
            why = "from the hub: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        else:
            why = "not found as a local folder or in the local Hugging Face cache"
        raise UserError(f"--tokenizer {name}: {why}; {OFFLINE_HINT}") from None


def load_samples(path: str, vocab_size: int | None = None) -> torch.Tensor:
    """The (N, T) int64 tensor of a `save_samples` file. Every row must have the first
    row's length and ids in [0, vocab_size) (only >= 0 when vocab_size is None)."""
    import torch

    rows = []
    for lineno, obj in _jsonl_objects(path):
        ids = obj.get("input_ids")
        where = f"{path}:{lineno}"
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise UserError(f"{where}: missing 'input_ids' (a non-empty list of integers)")
        if rows and len(ids) != len(rows[0]):
            raise UserError(f"{where}: {len(ids)} ids, but the first sample has "
                            f"{len(rows[0])} (samples are never padded)")
        bad = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)),
                   None)
        if bad is not None:
            raise UserError(f"{where}: token id {bad} is outside [0, {vocab_size or 'inf'})")
        rows.append(ids)
    if not rows:
        raise UserError(f"{path}: no samples")
    return torch.tensor(rows, dtype=torch.long)
