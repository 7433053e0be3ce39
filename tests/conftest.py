"""Shared test setup: offline Hugging Face, the checkout's paths and the tiny random GPT-2."""
import os

import pytest
import torch

import paths

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def root() -> str:
    """The checkout's top folder (the one with setup.cfg)."""
    return paths.ROOT


@pytest.fixture(scope="session")
def tiny_cpu() -> str:
    """deepspeed_configs/tiny-cpu.yaml: the 4-layer random GPT-2 on CPU."""
    return paths.TINY_CPU


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(tie_embeddings)`: the 4-layer, 5-head random GPT-2 in fp32 on CPU."""
    from gptbench.models import load_model

    cache = {}

    def make(tie_embeddings: bool = True):
        if tie_embeddings not in cache:
            cache[tie_embeddings] = load_model("tiny", "random", "tiny", torch.float32,
                                               torch.device("cpu"), seed=0,
                                               tie_embeddings=tie_embeddings)
        return cache[tie_embeddings]

    return make


TIERS = ("unit", "integration")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers given here
def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, the folder it lives in; a test outside both is an error."""
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        rel = os.path.relpath(str(item.path), here)
        tier = rel.split(os.sep, 1)[0]
        if tier not in TIERS:
            if rel.startswith(os.pardir):
                continue  # not one of ours (a path given outside tests/)
            raise pytest.UsageError(f"tests/{rel}: a test belongs in tests/unit/ (one process, "
                                    "seconds) or tests/integration/ (launches, compiles)")
        item.add_marker(getattr(pytest.mark, tier))
