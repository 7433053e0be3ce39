"""The DeepSpeed config of a run: `deepspeed_configs/ds_<strategy>.json` (or the file named
by `engine.deepspeed_config`), with the run's own settings laid on top.

The JSON holds DeepSpeed's settings that gptbench does not derive: the `init_inference`
config for data and tensor parallel, the `deepspeed.initialize` config for pipelines (e.g.
`pipeline.pipe_partitioned`, which must stay false on gloo with a model axis: the
activation gather fails there). What the benchmark YAML decides (kernel injection, CUDA
graphs, degrees, micro-batch sizes, dtype) is set in code and wins.
"""
from __future__ import annotations

import json
import os

from gptbench.errors import UserError

DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepspeed_configs")


def path_for(cfg) -> str:
    return cfg.engine.deepspeed_config or os.path.join(DIR, f"ds_{cfg.strategy}.json")


def load(cfg) -> dict:
    path = path_for(cfg)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError:
        raise UserError(f"engine.deepspeed_config: file not found: {path}") from None
    except (ValueError, RecursionError) as e:  # also: not UTF-8; nested beyond the stack
        raise UserError(f"engine.deepspeed_config: {path} is not valid JSON "
                        f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return data


def inference_config(cfg) -> dict:
    """`init_inference` config for data and tensor parallel, the YAML's switches on top."""
    return {**load(cfg), "replace_with_kernel_inject": cfg.engine.kernel_inject,
            "enable_cuda_graph": cfg.engine.cuda_graph}


def pipeline_config(cfg, micro_batches: int) -> dict:
    """`deepspeed.initialize` config of the PipelineEngine: no optimizer, forward only."""
    return {**load(cfg), "train_micro_batch_size_per_gpu": cfg.workload.batch_size // micro_batches,
            "gradient_accumulation_steps": micro_batches}
