"""Compiled decode: gptbench's own step (gptbench/step.py) under torch.compile, CUDA graphs
on GPUs.

Why: on a GPU, eager decode of GPT-2 XL at batch 4 is hundreds of small kernels per token
(48 blocks x ~20 ops), each paying several microseconds of host launch time, so a step
takes several milliseconds while reading the weights takes well under one. One compiled
graph per step (fullgraph), the KV cache written in place, parameters frozen into the
graph and, in mode="reduce-overhead", the step captured in a CUDA graph that replays with
one launch: what gpt-fast does for small-batch decode.

What costs: compilation (tens of seconds per rank, per shape: prefill and decode), never
timed. `CompileStats` reads torch's own counters: seconds inside dynamo/inductor, graph
breaks, graphs compiled. CUDA graph trees record a graph on the second call of a shape and
replay from the third, so the warm-up calls every shape `WARMUP_CALLS` times.
`CapturedCode` and `code_summary` read the generated code: what the decode graph takes as
inputs, whether it copies a cache buffer, how many kernels it launches (in the record).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

WARMUP_CALLS = 3  # 1: warm-up run, 2: CUDA graph recorded, 3: replayed (torch's cudagraph trees)


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


@dataclass(frozen=True)
class InductorOptions:
    """How a decode step is compiled (gptbench/step.py), all of it named in the record.

    freezing: parameters inlined as constants instead of graph inputs (CUDA graph trees
    check every input's address before each replay; GPT-2 XL has ~580 parameters).
    tuning: none | coordinate_descent (inductor tunes each kernel's launch config) |
    max_autotune (also benchmarks GEMM templates, minutes per shape).
    attention: math (inductor generates and fuses it) | sdpa (torch's fused kernel).
    skip_guard_eval: after warm-up, dynamo evaluates only the guards that tell its compiled
    graphs apart (torch.compiler.set_stance skip_guard_eval_unsafe): less host time per call."""
    mode: str                       # default | reduce-overhead
    freezing: bool = True
    tuning: str = "none"
    attention: str = "math"
    skip_guard_eval: bool = True
    fullgraph: bool = True

    @classmethod
    def of(cls, engine, mode: str) -> "InductorOptions":
        return cls(mode=mode, freezing=engine.freezing, tuning=engine.tuning,
                   attention=engine.attention, skip_guard_eval=engine.skip_guard_eval)

    @property
    def cudagraphs(self) -> bool:
        return self.mode == "reduce-overhead"

    def inductor_config(self) -> dict:
        return {"freezing": self.freezing,
                "coordinate_descent_tuning": self.tuning == "coordinate_descent",
                "max_autotune": self.tuning == "max_autotune",
                "triton.cudagraphs": self.cudagraphs}

    def as_record(self) -> dict:
        return {"mode": self.mode, "fullgraph": self.fullgraph, "dynamic": False,
                "attention": self.attention, "skip_guard_eval": self.skip_guard_eval,
                "tuning": self.tuning, **self.inductor_config()}

    def compile(self, fn):
        """fn compiled: one specialised graph per shape (dynamic=False; shapes never change
        within prefill or decode), the whole step one graph (fullgraph)."""
        opts = self.inductor_config()
        return torch.compile(fn, fullgraph=self.fullgraph, dynamic=False, options=opts)


@contextlib.contextmanager
def compiling(options: "InductorOptions | None"):
    """The span in which graphs are traced and compiled (warm-up). Freezing is read while
    dynamo traces, before inductor sees the graph, so `torch.compile(options=)` alone does
    not inline the parameters: it is set for the span. A pipeline stage keeps one cache per
    micro-batch, each with its own graphs: room for more than dynamo's default 8."""
    if options is None:
        yield
        return
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(options.inductor_config()), \
            dynamo_config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield


def measuring(options: "InductorOptions | None"):
    """The span of measured steps: the stance that skips redundant guard evaluation."""
    if options is None or not options.skip_guard_eval:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def mark_step() -> None:
    """Tell CUDA graph trees a new step begins: the previous step's outputs may be overwritten
    (we keep none of them: what is kept is cloned)."""
    torch.compiler.cudagraph_mark_step_begin()


@dataclass
class CompileStats:
    """Deltas of torch's compile counters over a span of this process."""
    compile_s: float
    graph_breaks: int
    graphs: int

    @staticmethod
    def _now() -> tuple[float, int, int]:
        from torch._dynamo.utils import compilation_time_metrics, counters

        seconds = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        return (seconds, sum(counters["graph_break"].values()),
                int(counters["stats"]["unique_graphs"]))

    @classmethod
    def since(cls, start: tuple[float, int, int]) -> "CompileStats":
        now = cls._now()
        return cls(now[0] - start[0], now[1] - start[1], now[2] - start[2])


def snapshot() -> tuple[float, int, int]:
    return CompileStats._now()


class CapturedCode:
    """Inductor's generated source of every graph compiled while this is active (the hook
    inductor itself calls to save a graph's code), for reading what a step really runs."""

    def __init__(self):
        self.codes: list[str] = []

    def __enter__(self) -> "CapturedCode":
        from torch._inductor.graph import GraphLowering

        self._saved = GraphLowering.__dict__["save_output_code"]
        codes = self.codes
        GraphLowering.save_output_code = staticmethod(lambda code: codes.append(code))
        return self

    def __exit__(self, *exc) -> None:
        from torch._inductor.graph import GraphLowering

        GraphLowering.save_output_code = self._saved


_INPUT = re.compile(r"assert_size_stride\((arg\d+_1), \(([^)]*)\)")
_KERNEL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused\w*\(|triton_\w+\.run\(|extern_kernels\.\w+\(|"
                     r"torch\.ops\.[\w.]+\()")


def code_summary(code: str, max_len: int) -> dict | None:
    """What one compiled graph takes and does, read from inductor's generated code.

    inputs: the graph's runtime inputs (parameters inlined by freezing are not inputs);
    cache_inputs: those shaped like a KV cache buffer (4-D, `max_len` long in dim 2);
    cache_copies: kernels or ops that copy into or out of a cache input (a functionalised
    update written back); cache_outputs: cache buffers among the graph's outputs;
    launches: kernels and extern calls per run of the graph; input_len: tokens per sequence
    the graph takes (1: a decode step)."""
    body = code.split("def call(", 1)
    if len(body) < 2:
        return None
    call = body[1].split("\nrunner = ", 1)[0]
    unpack = re.search(r"\n\s+(arg[\w, ]*?) = args\n", call)
    names = [n.strip() for n in unpack.group(1).split(",")] if unpack else []
    shapes = {name: [int(x) for x in dims.replace(" ", "").split(",") if x]
              for name, dims in _INPUT.findall(call)}
    caches = {n for n in names if len(shapes.get(n, [])) == 4 and shapes[n][2] == max_len}
    other = [shapes[n] for n in names if n not in caches and len(shapes.get(n, [])) in (2, 3)]
    lines = call.splitlines()
    copies = sum(1 for line in lines if "copy" in line.split("(", 1)[0]
                 and any(re.search(rf"\b{c}\b", line) for c in caches))
    ret = next((line for line in reversed(lines) if line.strip().startswith("return (")), "")
    return {"inputs": len(names), "cache_inputs": len(caches), "cache_copies": copies,
            "cache_outputs": sum(1 for c in caches if re.search(rf"\b{c}\b", ret)),
            "launches": sum(1 for line in lines if _KERNEL.match(line)),
            "input_len": other[0][1] if other else None}


def decode_graph(codes: list[str], max_len: int) -> dict | None:
    """The summary of the first decode graph (input_len 1) among `codes`, or None."""
    for code in codes:
        summary = code_summary(code, max_len)
        if summary is not None and summary["input_len"] == 1:
            return summary
    return None
