"""Load GPT-2 family models: hub name, local path, or seeded random weights from a config.

Random weights are how the demo and the tests run offline: throughput does not depend on
weight values, and parity is checked against the unsharded model of the same weights.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from gptbench.errors import UserError
from gptbench.modelspec import (  # noqa: F401 - known here too, as before
    ARCHITECTURES,
    PRESETS,
    WEIGHT_FILES,
    check_checkpoint,
    names_a_folder,
)


def gpt2_config(name: str, preset: str | None, tie_embeddings: bool = True):
    """The `GPT2Config` of a preset, a known hub name, or a local/hub checkpoint."""
    from transformers import GPT2Config

    if preset:
        last_id = PRESETS[preset]["vocab_size"] - 1  # GPT-2's 50256 lies outside a small vocab
        return GPT2Config(**PRESETS[preset], bos_token_id=last_id, eos_token_id=last_id,
                          tie_word_embeddings=tie_embeddings,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if name in ARCHITECTURES and not os.path.isdir(name):
        return GPT2Config(**ARCHITECTURES[name], tie_word_embeddings=tie_embeddings)
    if names_a_folder(name) and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"model.name: the folder {name} does not exist")
    return GPT2Config.from_pretrained(os.path.expanduser(name))


def load_model(name: str, weights: str, preset: str | None, dtype: torch.dtype,
               device: torch.device, seed: int = 0, tie_embeddings: bool = True):
    """The plain Hugging Face `GPT2LMHeadModel`, in eval mode, on `device`, in `dtype`."""
    from transformers import GPT2LMHeadModel

    if weights == "pretrained":
        model = GPT2LMHeadModel.from_pretrained(os.path.expanduser(name), dtype=dtype)
    else:
        model = random_model(gpt2_config(name, preset, tie_embeddings), dtype, seed)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def random_model(config, dtype: torch.dtype, seed: int):
    """A seeded random-weight model, always drawn on the CPU in the run's dtype.

    The CPU generator gives the same numbers on every machine; a CUDA device's generator
    does not (its kernels' launch shapes depend on the card), so ranks on mixed GPUs built
    there would hold different weights. In the run's dtype directly: an fp32 GPT-2 XL would
    first hold 6.4 GB per rank before the cast. The caller moves it to its device."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = GPT2LMHeadModel._from_config(config, dtype=dtype)
    return model


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def conv1d_to_linear(conv) -> nn.Linear:
    """A `transformers` Conv1D (weight (in, out)) as the equivalent `nn.Linear` (weight (out, in))."""
    nx, nf = conv.weight.shape
    linear = nn.Linear(nx, nf, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear
