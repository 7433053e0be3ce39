"""Loading GPT-2: in the run's dtype from the start, and model names that cannot be
loaded refused before any rank starts, saying what to do."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptbench import launcher
from gptbench.errors import UserError
from gptbench.models import PRESETS, check_checkpoint, load_model
from paths import TINY_CPU as CONFIG


class Fp32Allocations(TorchDispatchMode):
    """Every float32 tensor of at least `numel` elements any aten op produces."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_random_weights_are_built_in_the_run_dtype_without_an_fp32_copy():
    """GPT-2 XL built in fp32 and then cast needs 6.4 GB per rank at its peak; in bf16 from
    the start, half. No weight-sized fp32 tensor may exist while loading in bf16."""
    smallest_weight = PRESETS["tiny"]["n_embd"] ** 2
    with Fp32Allocations(smallest_weight) as spy:
        model = load_model("tiny", "random", "tiny", torch.bfloat16, torch.device("cpu"))
    assert spy.seen == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_missing_folder_is_named():
    for weights in ("random", "pretrained"):
        with pytest.raises(UserError, match="model.name: the folder /no/such/dir does not exist"):
            launcher.prepare(CONFIG, ["model.name=/no/such/dir", "model.preset=null",
                                      f"model.weights={weights}"])


def test_a_local_checkpoint_is_accepted_and_a_folder_without_weights_is_not(tmp_path):
    model = load_model("tiny", "random", "tiny", torch.float32, torch.device("cpu"))
    model.save_pretrained(tmp_path / "ckpt")
    sets = [f"model.name={tmp_path / 'ckpt'}", "model.preset=null", "model.weights=pretrained",
            f"output_dir={tmp_path / 'out'}"]
    assert launcher.prepare(CONFIG, sets).not_applicable is None
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="holds no Hugging Face checkpoint"):
        launcher.prepare(CONFIG, sets)


def test_a_hub_model_missing_from_an_offline_cache_says_how_to_get_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as e:
        check_checkpoint("gpt2-xl")
    msg = str(e.value)
    assert "gpt2-xl is not in the Hugging Face cache and HF_HUB_OFFLINE=1" in msg
    assert "--set model.name=/path/to/gpt2-xl" in msg and "model.weights=random" in msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_weights_are_drawn_on_the_cpu_whatever_the_device(dtype):
    """A CUDA device's generator draws different numbers on different cards (mixed GPUs,
    different weights, parity fails): the weights come from the CPU generator, then move.
    Shown with the meta device, which draws nothing: the CPU generator must advance exactly
    as far as for a CPU build."""
    cpu = load_model("tiny", "random", "tiny", dtype, torch.device("cpu"), seed=3)
    after_cpu = torch.random.get_rng_state()
    meta = load_model("tiny", "random", "tiny", dtype, torch.device("meta"), seed=3)
    assert torch.equal(torch.random.get_rng_state(), after_cpu)
    assert next(meta.parameters()).device.type == "meta"
    again = load_model("tiny", "random", "tiny", dtype, torch.device("cpu"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(cpu.parameters(), again.parameters()))
