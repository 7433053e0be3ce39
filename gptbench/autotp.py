"""Tensor-shard GPT-2 with DeepSpeed AutoTP, which refuses GPT-2 out of the box.

Stock DeepSpeed 0.19.8 deny-lists `gpt2` in AutoTP, crashes in the Conv1D path with an
explicit injection policy, and its fused kernels need `n_head % tp == 0` (GPT-2 XL has 25
heads). The recipe below (docs/deepspeed-notes.md, AutoTP for GPT-2) gives tokens equal to the unsharded model,
also for uneven heads (25 -> 13/12 at tp=2, 7/6/6/6 at tp=4):

1. every Conv1D in the blocks becomes an `nn.Linear` (weight transposed);
2. the blocks get a subclass of `GPT2Block`, so DeepSpeed skips its GPT-2 branch;
3. that class is registered as a [Q|K|V] fused type (`glmtype`);
4. `init_inference` with `injection_policy={block: (attn.c_proj, mlp.c_proj)}` and
   `tp_grain_size = head_dim` (the default 64 can leave a tiny model's lm_head shard empty);
5. afterwards each attention's `split_size` is set to its (now sharded) width.
"""
from __future__ import annotations

import functools

import torch

from gptbench.models import conv1d_to_linear

SHARDED_BLOCK = "GbShardedGPT2Block"


@functools.cache
def _sharded_block_class():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return type(SHARDED_BLOCK, (GPT2Block,), {"__doc__": "GPT2Block for AutoTP sharding."})


def apply_linear_blocks(model) -> type:
    """Steps 1-3: Linear layers and a registered block class. Returns that class."""
    from deepspeed.module_inject import fusedqkv_utils

    cls = _sharded_block_class()
    for block in model.transformer.h:
        for parent, child in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                              (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, child, conv1d_to_linear(getattr(parent, child)))
        block.__class__ = cls
    fusedqkv_utils.FUSED_QKV_TYPE_DICT[SHARDED_BLOCK] = "glmtype"
    return cls


def heads_per_rank(n_head: int, tp: int) -> list[int]:
    """How AutoTP spreads `n_head` heads over `tp` ranks: the first ranks take one more."""
    return [n_head // tp + (1 if r < n_head % tp else 0) for r in range(tp)]


class TPMpu:
    """The 4 methods DeepSpeed asks of an `mpu`; passing one makes it honour `tp_group`."""

    def __init__(self, group, ranks):
        self.group, self.ranks = group, ranks

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self):
        return self.ranks.index(torch.distributed.get_rank())

    def get_model_parallel_world_size(self):
        return len(self.ranks)

    def get_data_parallel_group(self):
        return None


def apply_tp(model, tp: int, group, ranks: list[int], dtype: torch.dtype,
             ds_config: dict | None = None):
    """Shard `model` in place over `group` (ranks `ranks`). Returns the `InferenceEngine`.

    `ds_config` is the rest of the `init_inference` config (dsconfig.inference_config)."""
    import deepspeed

    # A new dict: init_inference updates the one it is given in place.
    config = {**(ds_config or {}), "dtype": dtype,
              "tensor_parallel": {"tp_size": tp, "tp_group": group, "mpu": TPMpu(group, ranks)}}
    if config.get("replace_with_kernel_inject"):
        return deepspeed.init_inference(model, config=config)
    cls = apply_linear_blocks(model)
    config["tensor_parallel"]["tp_grain_size"] = model.config.n_embd // model.config.n_head
    config["injection_policy"] = {cls: ("attn.c_proj", "mlp.c_proj")}
    engine = deepspeed.init_inference(model, config=config)
    for block in model.transformer.h:
        block.attn.split_size = block.attn.c_attn.weight.shape[0] // 3
    return engine
