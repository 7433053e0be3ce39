"""Proof that compiled tensor parallelism holds together on one device: a rank's AutoTP
shard (tp=2 of a world of 2) and one full_model_parallel stage (tp=2 x pp=2, stage 0, tensor
rank 0), each built by the strategy's own code under torch's fake process group
(gptbench/emulate.py) and compiled as the run compiles it (reduce-overhead on CUDA, inductor
on CPU). Checked: no graph break, the all-reduce inside the generated code (a functional
collective, not a break around a Python call), and on CUDA no CUDA-graph skip.

`python -m gptbench.emulate_proof --device cuda` is what `make gpu-check` runs (GPT-2 XL
fp16: 13 of 25 heads on the shard); tests/integration/test_emulate.py runs `prove` on the tiny
model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

CASES = {
    "tp2_shard": (["strategy=tensor_data_hybrid", "topology.tp=2"], 2),
    "full_stage": (["strategy=full_model_parallel", "topology.tp=2", "topology.pp=2"], 4),
}
CONFIGS = {"cpu": "deepspeed_configs/tiny-cpu.yaml", "cuda": "deepspeed_configs/gpt2-xl-gpu.yaml"}


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["inductor"].get(k, 0) for k in counters["inductor"]
               if "cudagraph_skip" in k)


def prove(config: str, sets: list[str], ranks: int) -> dict:
    """Build rank 0's role of the configuration (compiled), run its warm-up inside
    inductor's code capture; return what the check needs."""
    from torch._inductor.utils import run_and_get_code

    from gptbench.compiled import CompileStats, snapshot
    from gptbench.config import load_config
    from gptbench.emulate import build_role, plan_for, roles, warm_up

    cfg = load_config(config, sets)
    plan = plan_for(cfg, ranks)
    if plan.compile_mode == "off":
        import dataclasses

        plan = dataclasses.replace(plan, compile_mode="reduce-overhead"
                                   if plan.device.type == "cuda" else "default")
    role = roles(plan.grid, plan.model_dims["n_head"])[0]
    gen, info, _ = build_role(plan, role)
    ids = plan.batches(role.rank)[0]
    def body():  # counters read inside: run_and_get_code resets dynamo before calling it
        skips, start = _cudagraph_skips(), snapshot()
        warm_up(gen, plan, ids)
        return CompileStats.since(start), _cudagraph_skips() - skips

    wall = time.perf_counter()
    (stats, skips), codes = run_and_get_code(body)
    code = "\n".join(codes)
    heads = info.get("heads_per_tp_rank") or []
    return {"strategy": cfg.strategy, "world_size": ranks, "rank": role.rank,
            "heads_on_rank": heads[0] if heads else None, "mode": plan.compile_mode,
            "device": plan.device.type, "graph_breaks": stats.graph_breaks,
            "graphs": stats.graphs, "compile_s": stats.compile_s,
            "warmup_wall_s": time.perf_counter() - wall,
            "all_reduce_in_code": "all_reduce" in code,
            "all_reduces_in_code": code.count("all_reduce"),
            "cudagraph_skips": skips if plan.device.type == "cuda" else None,
            "code_chars": len(code)}


def passed(result: dict) -> bool:
    return (result["graph_breaks"] == 0 and result["all_reduce_in_code"]
            and not result["cudagraph_skips"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptbench.emulate_proof")
    p.add_argument("--device", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--out", help="write the results here as JSON")
    a = p.parse_args(argv)
    out = {}
    for name, (sets, ranks) in CASES.items():
        sets = sets + (["model.weights=random"] if a.device == "cuda" else [])
        try:
            result = prove(CONFIGS[a.device], sets, ranks)
            result["passed"] = passed(result)
        except Exception as e:  # noqa: BLE001 - a case that fails is reported, the next runs
            result = {"passed": False, "error": f"{type(e).__name__}: {e}"[:500]}
        out[name] = result
        print(f"emulate-proof {name}: {json.dumps(result)}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r["passed"] for r in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
