"""Load GPT-2 family models: hub name, local path, or seeded random weights from a config.

Random weights are how the demo and the tests run offline: throughput does not depend on
weight values, and parity is checked against the unsharded model of the same weights.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from gptbench.errors import UserError

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


# What `from_pretrained` reads the weights from, one of these per checkpoint.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def names_a_folder(name: str) -> bool:
    """A path rather than a hub id ('gpt2-xl', 'openai-community/gpt2-xl')."""
    return (os.path.isdir(name) or name.startswith(("/", "./", "../", "~"))
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def check_checkpoint(name: str) -> None:
    """UserError, before any rank starts, when `from_pretrained(name)` cannot find weights:
    a folder that is missing or holds none, or a hub model that is neither in the Hugging
    Face cache nor reachable (HF_HUB_OFFLINE=1, or no network)."""
    if names_a_folder(name):
        folder = os.path.expanduser(name)
        if not os.path.isdir(folder):
            raise UserError(f"model.name: the folder {name} does not exist")
        missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(folder, f))]
        if missing or not any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES):
            raise UserError(f"model.name: {name} holds no Hugging Face checkpoint (config.json "
                            f"and one of {', '.join(WEIGHT_FILES)})")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    cached = [try_to_load_from_cache(name, f) for f in ("config.json",) + WEIGHT_FILES]
    if isinstance(cached[0], str) and any(isinstance(c, str) for c in cached[1:]):
        return
    fix = (f"get it once on a machine with network (python -c \"from transformers import "
           f"GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('{name}')\" fills the cache "
           f"{constants.HF_HUB_CACHE}; copy that folder here), or pass a local checkpoint "
           f"folder with --set model.name=/path/to/{name.split('/')[-1]}, or measure without "
           f"one: --set model.weights=random")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model.name: {name} is not in the Hugging Face cache and "
                        f"HF_HUB_OFFLINE=1 forbids downloading it; {fix}")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=10)
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, gated repo: all say why
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(f"model.name: {name} is not in the Hugging Face cache and cannot be "
                        f"downloaded ({reason}); {fix}") from None


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
