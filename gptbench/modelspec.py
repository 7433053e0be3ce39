"""What a model is, known without torch or transformers: the GPT-2 architectures and
presets, and whether a checkpoint can be found. The orchestrator (`gptbench run`, `suite`)
validates configurations with this alone, so it pays no torch import per launch.
"""
from __future__ import annotations

import json
import os

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


# GPT2Config's defaults (transformers' configuration_gpt2.py), for what config.json omits.
GPT2_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
                     tie_word_embeddings=True)
DIM_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")


def dims(name: str, preset: str | None, tie_embeddings: bool = True) -> dict | None:
    """n_layer, n_head, n_embd, vocab_size, n_positions and tied_embeddings, as
    `models.gpt2_config` would give them, without importing transformers; None for a hub
    checkpoint that only `from_pretrained` can read."""
    if preset:
        return {**{k: PRESETS[preset][k] for k in DIM_KEYS}, "tied_embeddings": tie_embeddings}
    if name in ARCHITECTURES and not os.path.isdir(name):
        c = {**GPT2_DEFAULTS, **ARCHITECTURES[name]}
        return {**{k: c[k] for k in DIM_KEYS}, "tied_embeddings": tie_embeddings}
    folder = os.path.expanduser(name)
    if names_a_folder(name) and not os.path.isdir(folder):
        raise UserError(f"model.name: the folder {name} does not exist")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            c = {**GPT2_DEFAULTS, **json.load(f)}
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot read the config of '{name}' ({e})") from None
    return {**{k: c[k] for k in DIM_KEYS}, "tied_embeddings": bool(c["tie_word_embeddings"])}
