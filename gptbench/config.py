"""Benchmark config: YAML read in one place into frozen dataclasses.

Precedence: dataclass defaults < YAML file < `--set key=value` (dotted names, the run
record's vocabulary). Every error is a `UserError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from gptbench import limits
from gptbench.errors import UserError

STRATEGIES = ("pure_data_parallel", "tensor_data_hybrid", "pipeline_data_hybrid",
              "full_model_parallel")
ALIASES = {"dp": "pure_data_parallel", "tp": "tensor_data_hybrid",
           "pp": "pipeline_data_hybrid", "full": "full_model_parallel"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS = ("pretrained", "random")
DEVICES = ("auto", "cpu", "cuda")
PARTITION_METHODS = ("parameters", "uniform")
BACKENDS = ("deepspeed", "hf_eager", "hf_compiled")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")
PIPELINE_SCHEDULES = ("in_flight", "flush")
PIPE_TOPOLOGIES = ("auto", "PipeDataParallelTopology", "PipeModelDataParallelTopology")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "gpt2-xl"
    weights: str = "pretrained"
    preset: typing.Optional[str] = None
    tie_embeddings: bool = True
    seed: int = 0


@dataclass(frozen=True)
class TopologyConfig:
    world_size: typing.Optional[int] = None  # None: as many ranks as the launcher started
    tp: typing.Optional[int] = None          # None: the strategy's default (2)
    pp: typing.Optional[int] = None
    micro_batches: typing.Optional[int] = None  # None: pp, enough to fill the pipeline
    partition_method: str = "parameters"
    pipe_topology: str = "auto"  # DeepSpeed's class; auto: PipeModelDataParallel iff tp > 1
    # in_flight: micro-batches circulate across decode steps (one fill/drain per generation);
    # flush: one PipelineEngine.eval_batch per token (fills and drains every token)
    pipeline_schedule: str = "in_flight"


@dataclass(frozen=True)
class WorkloadConfig:
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    batch_size: int = 4
    input_len: int = 256
    output_len: int = 64
    num_samples: int = 20  # per data-parallel replica (weak scaling)
    iterations: int = 3    # the least number of timed passes over the replica's batches
    # timed passes continue until both iterations and min_duration_s are reached (bounded
    # by half of timeout_s from the rank's start); 0: iterations alone
    min_duration_s: float = 0.0
    max_cv_pct: float = 10.0  # a pass-to-pass throughput CV above this makes the run invalid
    warmup: int = 1        # untimed batches before the timed iterations
    dataset: typing.Optional[str] = None  # None: seeded synthetic token ids


@dataclass(frozen=True)
class ParityConfig:
    enabled: bool = True
    # None: one whole batch of the replica, so the probe always splits into micro-batches
    samples: typing.Optional[int] = None
    tokens: int = 8  # capped by workload.output_len
    tolerance: typing.Optional[float] = None  # None: by dtype (parity.py)


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"
    # hf_eager: the plain Hugging Face model, no DeepSpeed; hf_compiled: Hugging Face
    # `generate` with its static cache and compile config (the baselines)
    backend: str = "deepspeed"
    # torch.compile of the decode step over a static KV cache; auto: reduce-overhead (CUDA
    # graphs) on CUDA, off on CPU
    compile: str = "auto"
    # how the decode step is compiled (gptbench/compiled.py InductorOptions)
    freezing: bool = True              # parameters inlined as constants, not graph inputs
    tuning: str = "none"               # none | coordinate_descent | max_autotune
    attention: str = "math"            # math (inductor fuses it) | sdpa
    skip_guard_eval: bool = True       # after warm-up, evaluate only distinguishing guards
    kernel_inject: bool = False
    cuda_graph: bool = False
    threads: typing.Optional[int] = None  # torch threads per rank; None: cores / local ranks
    deepspeed_config: typing.Optional[str] = None  # None: deepspeed_configs/ds_<strategy>.json
    # the watchdog timeout of every process group; auto: from the device and the predicted
    # compile time of ranks compiling at once (gptbench/watchdog.py)
    comm_timeout_s: typing.Union[float, str] = "auto"
    profile_comm: bool = True


@dataclass(frozen=True)
class RunConfig:
    strategy: str = "pure_data_parallel"
    run_id: typing.Optional[str] = None
    output_dir: str = "reports/latest"
    timeout_s: float = 1800.0
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


CHOICES = {
    "strategy": STRATEGIES, "model.weights": WEIGHTS, "workload.dtype": DTYPES,
    "engine.device": DEVICES, "topology.partition_method": PARTITION_METHODS,
    "engine.backend": BACKENDS, "topology.pipe_topology": PIPE_TOPOLOGIES,
    "engine.compile": COMPILE_MODES, "topology.pipeline_schedule": PIPELINE_SCHEDULES,
    "engine.tuning": ("none", "coordinate_descent", "max_autotune"),
    "engine.attention": ("math", "sdpa"),
}
POSITIVE = {"topology.world_size", "topology.tp", "topology.pp", "topology.micro_batches",
            "workload.batch_size", "workload.input_len", "workload.output_len",
            "workload.num_samples", "workload.iterations", "parity.samples", "parity.tokens",
            "engine.threads", "timeout_s", "engine.comm_timeout_s"}
AUTO_NUMBERS = {"engine.comm_timeout_s"}  # a number, or the string "auto"


def _coerce(key: str, value, hint):
    """`value` checked against the annotation `hint`; bools are not ints, ints are floats."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise UserError(f"{key}: expected {hint.__name__}{' or null' if optional else ''}, "
                        f"got {limits.show(value)}")
    return float(value) if hint is float else value


def _auto_or_number(key: str, value):
    if value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise UserError(f"{key}: expected a number or 'auto', got {limits.show(value)}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                        f"{limits.show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' "
                        f"(allowed: {', '.join(prefix + n for n in sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        elif prefix + name in AUTO_NUMBERS:
            kwargs[name] = _auto_or_number(prefix + name, value)
        else:
            kwargs[name] = _coerce(prefix + name, value, hint)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """`["a.b=3", "strategy=tp"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{pair}'")
        key = key.strip()
        if key.count(".") >= limits.MAX_YAML_DEPTH:
            raise UserError(f"--set {key[:60]}...: more sections than any config has")
        try:
            value = (limits.load_yaml(raw, f"--set {key}={raw[:60]}", lines=False)
                     if raw.strip() else None)
        except UserError as e:
            raise UserError(f"{e}; quote text that YAML reads otherwise: "
                            f"--set \"{key}='...'\"") from None
        _set_dotted(tree, key, value)
    return tree


def override_pairs(mapping, where: str) -> list[str]:
    """{"workload": {"batch_size": 4}, "strategy": "tp"} -> ["workload.batch_size=4", "strategy=tp"]."""
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping of key: value overrides")
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += [f"{key}.{pair}" for pair in override_pairs(value, where)]
        else:
            out.append(f"{key}={_yaml_scalar(value)}")
    return out


def set_pair(key: str, text: str) -> str:
    """`KEY=TEXT` for --set, quoted where YAML would read TEXT as something else
    (`run_id='1'`, `output_dir='null'`), so the ranks read back the launcher's string."""
    return f"{key}={_yaml_scalar(text)}"


def _yaml_scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True)  # "tp\n...\n" for a plain scalar
    return text.removesuffix("...\n").strip()


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str) -> dict:
    """A config or suite file: UTF-8 YAML whose keys are strings (limits.load_yaml)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    text = limits.read_text(path, "config", limits.MAX_CONFIG_BYTES)
    data = limits.load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data = read_yaml(path) if path else {}
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


def config_from_dict(data: dict) -> RunConfig:
    data = dict(data)
    if isinstance(data.get("strategy"), str):
        data["strategy"] = ALIASES.get(data["strategy"], data["strategy"])
    engine = data.get("engine")
    if isinstance(engine, dict) and engine.get("compile") is False:
        data["engine"] = {**engine, "compile": "off"}  # YAML 1.1 reads a bare `off` as false
    cfg = _build(RunConfig, data)
    _check_values(cfg)
    return cfg


def flat(cfg) -> dict:
    """{"workload.batch_size": 4, ...}: the dotted view used for messages and choices."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in flat(value).items()})
        else:
            out[f.name] = value
    return out


def _check_values(cfg: RunConfig) -> None:
    values = flat(cfg)
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            if key == "strategy":
                allowed = [f"{name} ({alias})" for alias, name in ALIASES.items()]
            raise UserError(f"{key}: '{values[key]}' is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if isinstance(values[key], (int, float)) and values[key] <= 0:
            raise UserError(f"{key}: must be positive, got {values[key]}")
    if cfg.parity.tolerance is not None and cfg.parity.tolerance < 0:
        raise UserError(f"parity.tolerance: must be >= 0, got {cfg.parity.tolerance}")
    if cfg.workload.warmup < 0:
        raise UserError(f"workload.warmup: must be >= 0, got {cfg.workload.warmup}")
    if cfg.workload.min_duration_s < 0:
        raise UserError(f"workload.min_duration_s: must be >= 0, got {cfg.workload.min_duration_s}")
    if cfg.workload.max_cv_pct <= 0:
        raise UserError(f"workload.max_cv_pct: must be positive, got {cfg.workload.max_cv_pct}")
    _check_bounds(values)
    from gptbench.models import PRESETS
    if cfg.model.preset is not None and cfg.model.preset not in PRESETS:
        raise UserError(f"model.preset: '{cfg.model.preset}' is not one of {', '.join(PRESETS)}")
    if cfg.model.preset is not None and cfg.model.weights == "pretrained":
        raise UserError("model.preset needs model.weights: random (presets have no checkpoint)")
    w = cfg.workload
    if w.num_samples % w.batch_size:
        raise UserError(f"workload.num_samples ({w.num_samples}) must be a multiple of "
                        f"workload.batch_size ({w.batch_size}): batches are never padded")
    if cfg.parity.enabled and (cfg.parity.samples or 0) > w.batch_size:
        raise UserError(f"parity.samples ({cfg.parity.samples}) must be <= workload.batch_size "
                        f"({w.batch_size})")
    if w.dataset is not None and not os.path.isfile(w.dataset):
        raise UserError(f"workload.dataset: file not found: {w.dataset}")


# The range each number can mean (limits.py); positivity is checked first, as POSITIVE.
INT_BOUNDS = {
    **dict.fromkeys(("topology.world_size", "topology.tp", "topology.pp"), (1, limits.MAX_WORLD)),
    **dict.fromkeys(("topology.micro_batches", "workload.batch_size", "parity.samples"),
                    (1, limits.MAX_BATCH)),
    **dict.fromkeys(("workload.input_len", "workload.output_len", "parity.tokens"),
                    (1, limits.MAX_LEN)),
    **dict.fromkeys(("workload.num_samples", "workload.iterations"), (1, limits.MAX_COUNT)),
    "workload.warmup": (0, limits.MAX_COUNT),
}
SECONDS = ("timeout_s", "engine.comm_timeout_s")
PATHS = ("output_dir", "workload.dataset", "engine.deepspeed_config", "model.name")


def _check_bounds(values: dict) -> None:
    for key, (low, high) in INT_BOUNDS.items():
        if values[key] is not None:
            limits.check_int(key, values[key], low, high)
    for key in SECONDS:
        if values[key] != "auto":  # engine.comm_timeout_s: auto (gptbench/watchdog.py)
            limits.check_float(key, values[key], 0, limits.MAX_SECONDS, low_open=True)
    limits.check_float("workload.min_duration_s", values["workload.min_duration_s"], 0,
                       limits.MAX_SECONDS)
    limits.check_float("workload.max_cv_pct", values["workload.max_cv_pct"], 0, 1e6,
                       low_open=True)
    if values["parity.tolerance"] is not None:
        limits.check_float("parity.tolerance", values["parity.tolerance"], 0, 1e6)
    limits.check_seed("model.seed", values["model.seed"])
    if values["engine.threads"] is not None:
        limits.check_threads("engine.threads", values["engine.threads"])
    for key in PATHS:
        if values[key] is not None:
            limits.check_text(key, values[key])
    limits.check_path("output_dir", values["output_dir"])
    if values["run_id"] is not None:
        limits.check_run_id("run_id", values["run_id"])
    tokens = values["workload.num_samples"] * values["workload.input_len"]
    if tokens > limits.MAX_TOKENS_PER_REPLICA:
        raise UserError(f"workload.num_samples x workload.input_len = {tokens:,} tokens per "
                        f"replica, more than {limits.MAX_TOKENS_PER_REPLICA:,} (2 GiB of token ids)")
