"""Time spent inside communication calls, per operation.

DeepSpeed's own call sites look functions up on a module object at call time, so patching
that attribute catches them (DeepSpeed 0.19.8, read from its source):
- AutoTP layers (`module_inject/layers.py`, `from deepspeed import comm as dist`):
  `LinearAllreduce.forward` -> `RowParallel.apply` -> `dist.inference_all_reduce` in
  inference mode (`dist.all_reduce` when training); `LmHeadLinearAllreduce` calls
  `dist.inference_all_reduce`; column-parallel gathers use `dist.all_gather_into_tensor`.
- Kernel-injected blocks (`ops/transformer/inference/ds_attention.py`, `ds_mlp.py`):
  `dist.all_reduce`.
- PipelineEngine (`runtime/pipe/engine.py`): activations via `p2p.send`/`p2p.recv`
  (`deepspeed.runtime.pipe.p2p`, which call `dist.send`/`dist.recv`), results via
  `dist.broadcast` over the pipe group, and `dist.barrier()` at the start of `eval_batch`.
Only the outermost tracked call is timed: `p2p.send` -> `dist.send` ->
`torch.distributed.send` counts once, as `deepspeed.runtime.pipe.p2p.send`.
Each call is bracketed by device synchronisation, so the time is the collective's, not the
queue's; this serialises compute and communication that could overlap, and a collective's
time includes waiting for the slowest peer (barrier time is that wait alone).
Collectives replayed inside a CUDA graph never reach Python and are not counted.
"""

import contextlib
import importlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from gptbench.trackers.timing import Clock, synchronize

DEFAULT_TARGETS: tuple[tuple[str, str], ...] = tuple(
    [("deepspeed.comm", name) for name in (
        "all_reduce", "inference_all_reduce", "broadcast", "all_gather",
        "all_gather_into_tensor", "send", "recv", "barrier")]
    + [("deepspeed.runtime.pipe.p2p", name) for name in ("send", "recv")]
    + [("torch.distributed", name) for name in (
        "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "send", "recv",
        "barrier")]
)


@dataclass
class OpStats:
    calls: int = 0
    seconds: float = 0.0


class CommTracker:
    """`with tracker:` patches DEFAULT_TARGETS; `with tracker.wrap(module, name):` one more."""

    def __init__(self, device: torch.device, clock: Clock = time.perf_counter,
                 targets: tuple[tuple[str, str], ...] = DEFAULT_TARGETS):
        self.device = device
        self.clock = clock
        self.targets = targets
        self.by_op: dict[str, OpStats] = {}
        self._inside = threading.local()
        self._stack: contextlib.ExitStack | None = None

    @property
    def seconds_total(self) -> float:
        return sum(stats.seconds for stats in self.by_op.values())

    @property
    def calls(self) -> int:
        return sum(stats.calls for stats in self.by_op.values())

    def __enter__(self) -> "CommTracker":
        with contextlib.ExitStack() as stack:
            for module_name, attr_name in self.targets:
                module = importlib.import_module(module_name)
                if hasattr(module, attr_name):  # older releases lack some ops
                    stack.enter_context(self.wrap(module, attr_name))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()
        self._stack = None

    @contextlib.contextmanager
    def wrap(self, module: ModuleType, attr_name: str) -> Iterator[None]:
        """Time every call of `module.attr_name` until the block ends, then restore it."""
        original = getattr(module, attr_name)
        op_name = f"{module.__name__}.{attr_name}"

        def timed(*args, **kwargs):
            if getattr(self._inside, "active", False):
                return original(*args, **kwargs)
            synchronize(self.device)
            start_s = self.clock()
            self._inside.active = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.active = False
                synchronize(self.device)
                stats = self.by_op.setdefault(op_name, OpStats())
                stats.calls += 1
                stats.seconds += self.clock() - start_s

        setattr(module, attr_name, timed)
        try:
            yield
        finally:
            setattr(module, attr_name, original)
