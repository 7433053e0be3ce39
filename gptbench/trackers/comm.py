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

How a call is timed depends on the device (`device_timing`, on for CUDA):
- CPU / gloo: the host clock, each call bracketed by device synchronisation (a no-op on
  CPU), so the blocked span is the collective's.
- CUDA / NCCL: never by synchronising around calls. On NCCL the launch and the sync cost
  about as much as a small NVLink all-reduce (~10-30 us against ~6-8 us), so a synced span
  would overstate communication about twice. Each torch.distributed call is issued
  non-blocking (`async_op=True`; send/recv as isend/irecv), waited on as the blocking call
  would (`work.wait()`: the current stream waits for NCCL's, the host does not), and its
  NCCL kernel time is read after the batch from the `Work` (`work.get_duration()`, which
  needs TORCH_NCCL_ENABLE_TIMING=1 before the group is made: the worker sets it). That time
  includes the kernel spinning for late peers; trackers/breakdown.py splits it (the group's
  shortest kernel is the transfer, the rest waiting). `Call.device_s` holds it.
Collectives replayed inside a CUDA graph never reach Python and are not counted.
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
    device_s: float | None = None  # the NCCL kernel's time (device_timing), else None

    def as_list(self) -> list:
        return [self.op, self.kind, list(self.group), self.nbytes, self.post_s,
                self.start_s, self.end_s, self.device_s]


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
                 log_calls: bool = False, device_timing: bool | None = None,
                 dist_module: str = TORCH_DIST):
        self.device = device
        self.clock = clock
        self.targets = targets
        self.log_calls = log_calls
        # None: by the device (CUDA: the Work's kernel time; else the host clock)
        self.device_timing = device.type == "cuda" if device_timing is None else device_timing
        self.dist_module = dist_module  # the module whose calls are logged and issued
        self.timing_error: str | None = None  # why a Work gave no duration
        self._pending: list[tuple[Call, object, str]] = []  # (call, work, outermost op)
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
        self.resolve()

    @property
    def method(self) -> str:
        return ("nccl_work_duration" if self.device_timing
                else "host_clock_with_device_syncs")

    def resolve(self) -> None:
        """Read the kernel time of every call issued on the device path (after the work is
        done: one device sync here, outside the calls) into its Call and its op's seconds."""
        if not self._pending:
            return
        synchronize(self.device)
        for call, work, outer in self._pending:
            try:
                call.device_s = work.get_duration() / 1e3  # milliseconds
            except (RuntimeError, AttributeError) as error:  # timing off, or not NCCL
                self.timing_error = " ".join(f"{type(error).__name__}: {error}".split())[:200]
                continue
            call.start_s, call.end_s = call.post_s, call.post_s + call.device_s
            self.by_op.setdefault(outer, OpStats()).seconds += call.device_s
        self._pending.clear()

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
        traced = module.__name__ == self.dist_module and attr_name in (*COLLECTIVES, *P2P)
        loggable = traced and (self.log_calls or self.device_timing)
        signature = inspect.signature(original) if loggable else None

        def timed(*args, **kwargs):
            outermost = not getattr(self._inside, "active", False)
            log_here = loggable and not getattr(self._inside, "logging", False)
            if not (outermost or log_here):
                return original(*args, **kwargs)
            if self.device_timing:
                return self._on_device(module, original, op_name, attr_name, signature,
                                       args, kwargs, outermost, log_here)
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

    def _on_device(self, module, original, op_name, attr_name, signature, args, kwargs,
                   outermost: bool, log_here: bool):
        """The device path: no sync; a torch.distributed call is issued non-blocking, waited
        on as the blocking call would be, and its Work kept for its kernel time."""
        if outermost:
            self._inside.active, self._inside.outer = True, op_name
            self.by_op.setdefault(op_name, OpStats()).calls += 1
        if log_here:
            self._inside.logging = True
        try:
            if not log_here:  # an outer wrapper: its time is its torch.distributed calls'
                return original(*args, **kwargs)
            post_s = self.clock()
            bound = signature.bind(*args, **kwargs)
            result, work = _issue(module, original, attr_name, bound)
            call = self._describe(attr_name, bound, result)
            call.post_s = call.start_s = call.end_s = post_s
            if work is not None:
                self._pending.append((call, work, self._inside.outer))
            if self.log_calls:
                self.log.append(call)
            return result
        finally:
            if log_here:
                self._inside.logging = False
            if outermost:
                self._inside.active = False


def _issue(module, original, attr_name: str, bound: inspect.BoundArguments):
    """(what the caller gets back, the Work to time) of one torch.distributed call issued
    non-blocking. A blocking call is waited on here, as torch would (`work.wait()`)."""
    args = bound.arguments
    if attr_name in ("isend", "irecv") or args.get("async_op"):
        result = original(*bound.args, **bound.kwargs)
        return result, result
    if attr_name in ("send", "recv"):
        peer = args.get("dst" if attr_name == "send" else "src")
        tensor = args.get("tensor")
        extra = {k: args[k] for k in ("group", "tag", "group_dst" if attr_name == "send"
                                      else "group_src") if args.get(k) is not None}
        issue = module.isend if attr_name == "send" else module.irecv
        work = issue(tensor, peer, **extra)
        if work is not None:
            work.wait()
        return (peer if attr_name == "recv" else None), work
    bound.arguments["async_op"] = True
    work = original(*bound.args, **bound.kwargs)
    if work is not None:  # None: this rank is not in the group
        work.wait()
    return None, work
