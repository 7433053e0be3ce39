"""Load GPT-2 family models: hub name, local path, or seeded random weights from a config.

Random weights are how the demo and the tests run offline: throughput does not depend on
weight values, and parity is checked against the unsharded model of the same weights.
"""
from __future__ import annotations

import os

import torch
from torch import nn

# Architecture of the hub models, so `weights: random` needs no download.
ARCHITECTURES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

# `tiny`: odd head count (5, like GPT-2 XL's 25) so uneven tensor sharding is exercised;
# a wider init range than GPT-2's 0.02 keeps greedy output from collapsing to one token.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=5, n_embd=80, vocab_size=512, n_positions=512,
                 initializer_range=0.2),
    "small": dict(n_layer=6, n_head=5, n_embd=320, vocab_size=8192, n_positions=1024,
                  initializer_range=0.05),
}


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
    return GPT2Config.from_pretrained(name)


def load_model(name: str, weights: str, preset: str | None, dtype: torch.dtype,
               device: torch.device, seed: int = 0, tie_embeddings: bool = True):
    """The plain Hugging Face `GPT2LMHeadModel`, in eval mode, on `device`, in `dtype`."""
    from transformers import GPT2LMHeadModel

    if weights == "pretrained":
        model = GPT2LMHeadModel.from_pretrained(name, dtype=dtype)
    else:
        config = gpt2_config(name, preset, tie_embeddings)
        torch.manual_seed(seed)
        # Built on the target device directly: no extra full copy on the host first.
        with torch.device(device):
            model = GPT2LMHeadModel(config)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = model.config.eos_token_id
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
