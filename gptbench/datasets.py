"""Benchmark inputs: prompt files, fixed-shape token samples, and their JSONL form.

Every sample is exactly `input_len` tokens, never padded: padding would change the work
per sequence and break the bytes-per-step arithmetic. Generation cost does not depend on
which tokens are fed, so seeded random ids are the default; real prompts are tiled to the
same shape when a tokenizer is at hand.
"""
from __future__ import annotations

import json
import os

import torch

from gptbench.errors import UserError

PROMPT_KEYS = ("prompt", "text")


def _jsonl_objects(path: str):
    """(line number, object) of each non-blank line; UserError naming path:line if bad."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
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
    """One {"input_ids": [...]} line per row of the (N, T) `samples`."""
    if samples.dim() != 2:
        raise ValueError(f"samples must be (num_samples, input_len), got {tuple(samples.shape)}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in samples.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")


def load_samples(path: str, vocab_size: int | None = None) -> torch.Tensor:
    """The (N, T) int64 tensor of a `save_samples` file. Every row must have the first
    row's length and ids in [0, vocab_size) (only >= 0 when vocab_size is None)."""
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
