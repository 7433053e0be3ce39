"""Time spent inside communication calls, per operation, and a log of every call for the
time breakdown (compute / communication / waiting, gptbench/breakdown.py).

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
- `deepspeed.comm`'s torch backend (`comm/torch.py`) ends every one of these in a
  `torch.distributed.<op>(...)` call, also looked up at call time.
`by_op` counts only the outermost tracked call: `p2p.send` -> `dist.send` ->
`torch.distributed.send` counts once, as `deepspeed.runtime.pipe.p2p.send`.
`log` records every `torch.distributed` call (whoever made it) with its group or peer and
its timestamps, so calls can be matched across ranks: the k-th call on a group is the same
collective on every member, the k-th send a->b is the k-th receive on b from a.
Non-blocking `isend`/`irecv` (and `async_op=True`) return a handle whose `wait()` is timed:
the time blocked is the time inside `wait()`.

Each call is bracketed by device synchronisation, so the time is the collective's, not the
queue's; this serialises compute and communication that could overlap. Collectives replayed
inside a CUDA graph never reach Python and are not counted.
"""

import contextlib
import importlib
import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from gptbench.trackers.timing import Clock, synchronize

TORCH_DIST = "torch.distributed"
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "barrier")
P2P = ("send", "recv", "isend", "irecv")

DEFAULT_TARGETS: tuple[tuple[str, str], ...] = tuple(
    [("deepspeed.comm", name) for name in (
        "all_reduce", "inference_all_reduce", "broadcast", "all_gather",
        "all_gather_into_tensor", "send", "recv", "isend", "irecv", "barrier")]
    + [("deepspeed.runtime.pipe.p2p", name) for name in ("send", "recv")]
    + [(TORCH_DIST, name) for name in (*COLLECTIVES, *P2P)]
)


@dataclass
class OpStats:
    calls: int = 0
    seconds: float = 0.0


@dataclass
class Call:
    """One torch.distributed call on this rank. Times are `clock()` readings (seconds).

    kind: "collective" (group = its members' global ranks), "send" or "recv" (group =
    (source rank, destination rank)). post_s: when the operation was issued; start_s/end_s:
    the span this rank was blocked in it (the call itself, or the handle's `wait()`;
    None when a non-blocking operation was never waited on)."""
    op: str
    kind: str
    group: tuple
    nbytes: int
    post_s: float
    start_s: float | None = None
    end_s: float | None = None

    def as_list(self) -> list:
        return [self.op, self.kind, list(self.group), self.nbytes, self.post_s,
                self.start_s, self.end_s]


class _TimedWork:
    """A non-blocking operation's handle: `wait()` is timed into its Call."""

    def __init__(self, work, call: Call, tracker: "CommTracker"):
        self._work, self._call, self._tracker = work, call, tracker

    def wait(self, *args, **kwargs):
        start_s = self._tracker.clock()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            synchronize(self._tracker.device)
            end_s = self._tracker.clock()
            if self._call.start_s is None:
                self._call.start_s = start_s
            self._call.end_s = end_s

    def __getattr__(self, name):
        return getattr(self._work, name)


def _nbytes(tensor) -> int:
    if isinstance(tensor, torch.Tensor):
        return tensor.numel() * tensor.element_size()
    if isinstance(tensor, (list, tuple)):
        return sum(_nbytes(t) for t in tensor)
    return 0


class CommTracker:
    """`with tracker:` patches DEFAULT_TARGETS; `with tracker.wrap(module, name):` one more.

    `log_calls=True` also fills `log` (one `Call` per torch.distributed call)."""

    def __init__(self, device: torch.device, clock: Clock = time.perf_counter,
                 targets: tuple[tuple[str, str], ...] = DEFAULT_TARGETS,
                 log_calls: bool = False):
        self.device = device
        self.clock = clock
        self.targets = targets
        self.log_calls = log_calls
        self.by_op: dict[str, OpStats] = {}
        self.log: list[Call] = []
        self._inside = threading.local()
        self._group_ranks: dict[int, tuple[int, ...]] = {}
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

    def _ranks_of(self, group) -> tuple[int, ...]:
        key = id(group)
        if key not in self._group_ranks:
            if group is None or group is torch.distributed.GroupMember.WORLD:
                ranks = tuple(range(torch.distributed.get_world_size()))
            else:
                ranks = tuple(torch.distributed.get_process_group_ranks(group))
            self._group_ranks[key] = ranks
        return self._group_ranks[key]

    def _describe(self, attr_name: str, bound: inspect.BoundArguments, result) -> Call:
        """The Call of a torch.distributed operation, from its bound arguments."""
        args = bound.arguments
        me = torch.distributed.get_rank()
        tensor = args.get("tensor", args.get("input_tensor", args.get("tensor_list")))
        if attr_name in P2P:
            send = attr_name in ("send", "isend")
            peer = args.get("dst") if send else args.get("src")
            if peer is None and not send and isinstance(result, int):
                peer = result  # recv from any source returns the sender
            group = (me, peer) if send else (peer, me)
            return Call(attr_name, "send" if send else "recv", group, _nbytes(tensor), 0.0)
        return Call(attr_name, "collective", self._ranks_of(args.get("group")),
                    _nbytes(tensor), 0.0)

    @contextlib.contextmanager
    def wrap(self, module: ModuleType, attr_name: str) -> Iterator[None]:
        """Time every call of `module.attr_name` until the block ends, then restore it."""
        original = getattr(module, attr_name)
        op_name = f"{module.__name__}.{attr_name}"
        loggable = (self.log_calls and module.__name__ == TORCH_DIST
                    and attr_name in (*COLLECTIVES, *P2P))
        signature = inspect.signature(original) if loggable else None

        def timed(*args, **kwargs):
            outermost = not getattr(self._inside, "active", False)
            log_here = loggable and not getattr(self._inside, "logging", False)
            if not (outermost or log_here):
                return original(*args, **kwargs)
            synchronize(self.device)
            start_s = self.clock()
            self._inside.active = True
            if log_here:
                self._inside.logging = True
            result = None
            try:
                result = original(*args, **kwargs)
                return self._hand_back(result, attr_name, signature, args, kwargs, start_s,
                                       log_here)
            finally:
                if log_here:
                    self._inside.logging = False
                if outermost:
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

    def _hand_back(self, result, attr_name, signature, args, kwargs, start_s, log_here):
        """Log the call; a non-blocking one's handle comes back wrapped (its wait is timed)."""
        if not log_here:
            return result
        bound = signature.bind(*args, **kwargs)
        call = self._describe(attr_name, bound, result)
        call.post_s = start_s
        self.log.append(call)
        blocking = attr_name not in ("isend", "irecv") and not bound.arguments.get("async_op")
        if blocking:
            synchronize(self.device)
            call.start_s, call.end_s = start_s, self.clock()
            return result
        return _TimedWork(result, call, self) if result is not None else result
