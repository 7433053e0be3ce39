"""Everything about a run that can be decided before any process group exists.

`resolve` turns a config and a world size into a `RunPlan` (grid, device, dtype, micro-
batches, model dimensions) and raises `UserError` / `NotApplicable` for whatever cannot
work, so `gptbench run` and the suite can refuse bad input before starting a process.

The orchestrator resolves every configuration before it launches: for a CPU run of a
preset or a known architecture that imports neither torch nor transformers (seconds per
process on a small machine). torch is imported where the answer needs it: engine.device
auto or cuda (is there a GPU?), a hub checkpoint's config, a dataset of prompts, and
`plan.device` / `plan.dtype` (torch objects) in the ranks.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from gptbench import topology
from gptbench.config import RunConfig
from gptbench.errors import UserError
from gptbench.topology import Grid, check_against_model, make_grid, micro_batches

DTYPES = ("float32", "bfloat16", "float16")  # the torch dtypes of workload.dtype


@dataclass(frozen=True)
class RunPlan:
    cfg: RunConfig
    grid: Grid
    run_id: str
    device_type: str            # cpu | cuda
    device_index: int | None    # the local rank's GPU; None on CPU
    dtype_name: str             # float32 | bfloat16 | float16
    micro_batches: int
    threads: int
    model_dims: dict  # name, weights, preset, n_layer, n_head, n_embd, vocab_size, n_positions
    compile_mode: str = "off"  # effective engine.compile: off | default | reduce-overhead

    @property
    def device(self):
        """This rank's torch.device."""
        import torch

        return torch.device(self.device_type, self.device_index)

    @property
    def dtype(self):
        """The run's torch dtype."""
        import torch

        return getattr(torch, self.dtype_name)

    def load_model(self):
        from gptbench.models import load_model

        m = self.cfg.model
        return load_model(m.name, m.weights, m.preset, self.dtype, self.device, m.seed,
                          m.tie_embeddings)

    def batches(self, rank: int) -> list:
        """This rank's replica's disjoint shard of the samples, in batches (on device)."""
        w = self.cfg.workload
        samples = workload_samples(self.cfg, self.model_dims["vocab_size"], self.grid.dp)
        _, replica, _ = self.grid.coords(rank)
        shard = samples[replica * w.num_samples:(replica + 1) * w.num_samples]
        return [b.to(self.device) for b in shard.split(w.batch_size)]


def holds_token_ids(path: str) -> bool:
    """A samples file (`{"input_ids": [...]}` lines) rather than prompts to tokenize."""
    from gptbench.limits import read_text

    text = read_text(path, "workload.dataset")  # names the byte that is not UTF-8
    first = next((line for line in text.splitlines() if line.strip()), "")
    return '"input_ids"' in first


def workload_samples(cfg: RunConfig, vocab_size: int, dp: int):
    """(dp * num_samples, input_len) token ids, the same on every rank (seeded)."""
    from gptbench import datasets

    w = cfg.workload
    total = dp * w.num_samples
    if w.dataset is None:
        return datasets.make_samples(total, w.input_len, vocab_size, cfg.model.seed)
    if holds_token_ids(w.dataset):
        ids = datasets.load_samples(w.dataset, vocab_size)  # names a line with ids >= vocab
        if ids.shape[0] < total or ids.shape[1] < w.input_len:
            raise UserError(f"workload.dataset: {w.dataset} holds {ids.shape[0]} samples of "
                            f"{ids.shape[1]} tokens; this run needs {total} of {w.input_len}")
        return ids[:total, :w.input_len]
    from gptbench.models import load_tokenizer

    prompts = datasets.load_prompts(w.dataset)
    return datasets.make_samples(total, w.input_len, vocab_size, cfg.model.seed,
                                 prompts=prompts, tokenizer=load_tokenizer(cfg.model.name))


def check_output_dir(path: str) -> None:
    """UserError unless `path`/runs is a folder this process can write in, or can be
    created (limits.writable_folder_problem: probed, nothing stays). The folders a run
    writes into must be folders: a file named `runs` in `path` is refused here, before
    the run starts, not found by the ranks."""
    from gptbench import limits

    limits.check_path("output_dir", path)
    for sub in ("logs", os.path.join("runs", ".ranks"), os.path.join("runs", ".previous")):
        inner = os.path.join(path, sub)
        if os.path.lexists(inner) and not os.path.isdir(inner):
            raise UserError(f"output_dir: cannot write in {path}: {inner} is not a folder")
    problem = limits.writable_folder_problem(os.path.join(path, "runs"))
    if problem:
        raise UserError(f"output_dir: cannot create {path}: {problem}")


def run_id_for(cfg: RunConfig, world_size: int) -> str:
    if cfg.run_id:
        return cfg.run_id
    from gptbench.results import default_run_id

    t = cfg.topology
    try:
        grid = make_grid(cfg.strategy, world_size, t.tp, t.pp)
        return default_run_id(cfg.strategy, world_size, grid.tp, grid.pp)
    except UserError:  # a grid that cannot be formed is named by the degrees it asked for
        tp = 1 if cfg.strategy in ("pure_data_parallel", "pipeline_data_hybrid") else t.tp or 2
        pp = 1 if cfg.strategy in ("pure_data_parallel", "tensor_data_hybrid") else t.pp or 2
        return default_run_id(cfg.strategy, world_size, tp, pp)


def model_dims(cfg: RunConfig) -> dict:
    from gptbench import modelspec

    m = cfg.model
    dims = modelspec.dims(m.name, m.preset, m.tie_embeddings)
    if dims is None:  # a hub checkpoint: only transformers knows where its config is
        from gptbench.models import gpt2_config

        try:
            c = gpt2_config(m.name, m.preset, m.tie_embeddings)
        except (OSError, ValueError) as e:
            raise UserError(f"model.name: cannot read the config of '{m.name}' "
                            f"({str(e).splitlines()[0]})") from None
        dims = {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                "vocab_size": c.vocab_size, "n_positions": c.n_positions,
                "tied_embeddings": bool(c.tie_word_embeddings)}
    return {"name": m.name, "weights": m.weights, "preset": m.preset, **dims}


def device_spec(cfg: RunConfig, local_rank: int, local_size: int | None = None
                ) -> tuple[str, int | None]:
    """("cuda", local rank) or ("cpu", None); torch is asked only when engine.device is
    auto or cuda. `local_size`: the ranks on this machine (default: up to this one), each
    of which needs its own GPU."""
    want = cfg.engine.device
    if want == "cpu":
        return "cpu", None
    import torch

    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check_gpu_count(max(local_size or 0, local_rank + 1), count)
        return "cuda", local_rank
    return "cpu", None


def select_device(cfg: RunConfig, local_rank: int, local_size: int | None = None):
    """This rank's torch.device: cuda:<local rank>, or cpu (device_spec)."""
    import torch

    return torch.device(*device_spec(cfg, local_rank, local_size))


def check_gpu_count(local_ranks: int, gpus_seen: int) -> None:
    """One GPU per rank on this machine, checked before anything starts, whether
    CUDA_VISIBLE_DEVICES is set or not (NCCL refuses two ranks of a group on one GPU)."""
    if gpus_seen < local_ranks:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"engine.device: cuda requested for {local_ranks} rank(s) on this machine, one "
            f"GPU each, but torch sees {gpus_seen} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{'unset' if visible is None else repr(visible)})")


def dtype_name(cfg: RunConfig, device_type: str) -> str:
    name = cfg.workload.dtype
    if name == "auto":
        name = "float16" if device_type == "cuda" else "float32"
    if name == "float16" and device_type == "cpu":
        raise UserError("workload.dtype: float16 is refused by DeepSpeed's CPU accelerator; "
                        "use float32 or bfloat16 on CPU")
    return name


def select_dtype(cfg: RunConfig, device):
    """The run's torch dtype on `device` (a torch.device)."""
    import torch

    return getattr(torch, dtype_name(cfg, device.type))


# DeepSpeed 0.19.8's GPT-2 kernel-injection container replaces GPT2Block with a layer that
# speaks the `layer_past` tuple interface of transformers <= 4.51 and keeps its own KV
# workspace; from 4.52 GPT-2 passes a Cache object and, in 5.x, expects a tensor back
# (source reading in gptbench/gpucheck.py; not yet run on a GPU).
KERNEL_INJECT_MAX_TRANSFORMERS = (4, 51)


def _check_kernel_transformers() -> None:
    import transformers

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version > KERNEL_INJECT_MAX_TRANSFORMERS:
        raise UserError(
            f"engine.kernel_inject: DeepSpeed's GPT-2 kernels follow the transformers<=4.51 "
            f"block interface (layer_past tuples); this environment has transformers "
            f"{transformers.__version__}, whose GPT-2 passes a Cache object")


def _probe_parity(cfg: RunConfig, micro_batches: int) -> RunConfig:
    """The config with the parity probe's effective size: `samples: null` is one whole batch
    (which divides into the micro-batches), `tokens` at most output_len. An explicit probe
    runs through the pipeline like a batch, so it must split into the micro-batches too."""
    p, w = cfg.parity, cfg.workload
    if p.enabled and p.samples is not None and p.samples % micro_batches:
        raise UserError(f"parity.samples={p.samples} does not split into "
                        f"topology.micro_batches={micro_batches}; use a multiple of "
                        f"{micro_batches} or null (one whole batch)")
    return dataclasses.replace(cfg, parity=dataclasses.replace(
        p, samples=p.samples or w.batch_size, tokens=min(p.tokens, w.output_len)))


def resolve(cfg: RunConfig, world_size: int, local_rank: int = 0,
            local_size: int | None = None) -> RunPlan:
    t, w, e = cfg.topology, cfg.workload, cfg.engine
    if t.world_size is not None and t.world_size != world_size:
        raise UserError(f"topology.world_size={t.world_size} but {world_size} ranks were started")
    grid = make_grid(cfg.strategy, world_size, t.tp, t.pp)
    dims = model_dims(cfg)
    check_against_model(grid, dims["n_head"], dims["n_layer"])
    if w.input_len + w.output_len > dims["n_positions"]:
        raise UserError(f"workload.input_len + workload.output_len = {w.input_len + w.output_len} "
                        f"exceeds the model's {dims['n_positions']} positions")
    if t.pipe_topology == "PipeDataParallelTopology" and grid.tp > 1:
        raise UserError(f"topology.pipe_topology: PipeDataParallelTopology has no model axis "
                        f"for tp={grid.tp}; use PipeModelDataParallelTopology or auto")
    m = micro_batches(grid, w.batch_size, t.micro_batches)  # the rule plan uses too
    if e.cuda_graph:
        # DeepSpeed's InferenceEngine (_create_cuda_graph/_graph_replay) records the first
        # forward's shapes and replays that graph for every later call.
        raise UserError("engine.cuda_graph: DeepSpeed records the first forward (the prefill, "
                        f"batch x {w.input_len} tokens) and replays it for every later call, so "
                        "each decode step would rerun the prefill; for CUDA graphs use "
                        "engine.compile: reduce-overhead (one graph per shape, static KV cache)")
    cfg = _probe_parity(cfg, m)
    if e.kernel_inject and dims["n_head"] % grid.tp:
        raise UserError(f"engine.kernel_inject: DeepSpeed's fused kernels need n_head % tp == 0; "
                        f"{dims['n_head']} heads do not split over tp={grid.tp}")
    if (e.kernel_inject or e.cuda_graph) and grid.pp > 1:
        raise UserError("engine.kernel_inject/cuda_graph: not available inside a PipelineModule")
    if e.backend != "deepspeed" and (cfg.strategy != "pure_data_parallel"
                                     or e.kernel_inject or e.cuda_graph):
        raise UserError(f"engine.backend: {e.backend} is the plain Hugging Face model: only "
                        "with pure_data_parallel and without kernel_inject/cuda_graph")
    if e.kernel_inject:
        _check_kernel_transformers()
    if cfg.engine.backend == "deepspeed":
        from gptbench import dsconfig

        dsconfig.load(cfg)  # a missing or malformed DeepSpeed JSON is bad input
    local_size = local_size or world_size
    device_type, device_index = device_spec(cfg, local_rank, local_size)
    if (e.kernel_inject or e.cuda_graph) and device_type != "cuda":
        raise UserError("engine.kernel_inject/cuda_graph: DeepSpeed's fused kernels are CUDA-only")
    dtype = dtype_name(cfg, device_type)
    compile_mode = resolve_compile(cfg, device_type)
    check_schedule(cfg, grid, m)
    if cfg.model.weights == "pretrained":
        from gptbench.models import check_checkpoint

        check_checkpoint(cfg.model.name)  # after the GPUs: a missing GPU is the first thing to say
    threads = e.threads or max(1, (os.cpu_count() or 1) // local_size)
    return RunPlan(cfg=cfg, grid=grid, run_id=run_id_for(cfg, world_size),
                   device_type=device_type, device_index=device_index, dtype_name=dtype,
                   micro_batches=m, threads=threads, model_dims=dims, compile_mode=compile_mode)


def resolve_compile(cfg: RunConfig, device_type: str) -> str:
    """The effective engine.compile of this run (gptbench/compiled.py), or UserError."""
    e = cfg.engine
    if e.backend == "hf_eager":
        if e.compile not in ("auto", "off"):
            raise UserError(f"engine.compile={e.compile}: hf_eager is the eager baseline; "
                            "use engine.backend: hf_compiled for Hugging Face's compiled path")
        return "off"
    if e.kernel_inject or e.cuda_graph:
        if e.compile not in ("auto", "off"):
            raise UserError(f"engine.compile={e.compile} does not combine with DeepSpeed's "
                            "engine.kernel_inject/cuda_graph (their own kernels and graph "
                            "capture); set engine.compile: off")
        return "off"
    if e.backend == "hf_compiled":
        if e.compile == "off":
            raise UserError("engine.backend: hf_compiled with engine.compile: off is hf_eager "
                            "with a static cache; choose one (hf_eager, or compile auto/default)")
        # `auto` compiles here even on CPU: the backend's name says so
        return effective_mode("reduce-overhead" if e.compile == "auto" else e.compile,
                              device_type)
    return effective_mode(e.compile, device_type)


def effective_mode(requested: str, device_type: str) -> str:
    """off | default | reduce-overhead: what actually runs on `device_type`.

    auto is reduce-overhead on CUDA and off on CPU (compiling a small model on a few cores
    costs tens of seconds). reduce-overhead means CUDA graphs, which a CPU has not: there it
    is plain inductor, i.e. default."""
    if requested == "auto":
        return "reduce-overhead" if device_type == "cuda" else "off"
    if requested == "reduce-overhead" and device_type != "cuda":
        return "default"
    return requested


def check_schedule(cfg: RunConfig, grid: Grid, micro_batches: int) -> None:
    """The in-flight pipeline schedule needs a micro-batch for every stage to keep busy
    (topology.check_schedule: the rule gptbench plan applies too)."""
    topology.check_schedule(cfg.topology.pipeline_schedule, grid, micro_batches)
