"""Fault injection for tests and users: GPTBENCH_FAULT=rank=R,at=POINT,kind=KIND.

POINT is load, prefill or decode (the first time that rank reaches it); KIND is crash (an
exception), hang (sleep until killed), oom (the device's out-of-memory error: a real
CUDA OOM on GPUs, torch.OutOfMemoryError raised on CPU) or sigkill (the rank SIGKILLs
itself, as the kernel's OOM killer does when host memory runs out: no error file, no
Python exception). The rank says on stderr what it injects, so a log shows that the fault
fired (a hang is otherwise silent).

`gptbench run` and `gptbench suite` check the spec before anything starts (exit 2).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from gptbench import limits
from gptbench.errors import UserError

POINTS = ("load", "prefill", "decode")
KINDS = ("crash", "hang", "oom", "sigkill")
ENV = "GPTBENCH_FAULT"
FIELDS = ("rank", "at", "kind")


@dataclass(frozen=True)
class Fault:
    rank: int
    at: str
    kind: str


def parse(spec: str | None) -> Fault | None:
    """The fault of a GPTBENCH_FAULT value; None when unset or empty."""
    if spec is None or not spec.strip():
        return None
    limits.check_text(ENV, spec, max_len=200)  # one line of ASCII-sized fields
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(f"{ENV}='{spec}': '{part.strip()}' is not key=value "
                            f"(expected rank=R,at={'|'.join(POINTS)},kind={'|'.join(KINDS)})")
        if key not in FIELDS:
            raise UserError(f"{ENV}='{spec}': unknown field '{key}' (allowed: {', '.join(FIELDS)})")
        fields[key] = value
    missing = [k for k in FIELDS if k not in fields]
    if missing:
        raise UserError(f"{ENV}='{spec}': missing '{missing[0]}' (expected rank=R,at=POINT,kind=KIND)")
    rank = limits.ascii_int(fields["rank"])  # isdigit() says yes to '²', which int() refuses
    if rank is None or rank >= limits.MAX_WORLD:
        raise UserError(f"{ENV}: rank='{fields['rank'][:20]}' is not a rank number "
                        f"(0, 1, ... below {limits.MAX_WORLD})")
    if fields["at"] not in POINTS:
        raise UserError(f"{ENV}: at='{fields['at']}' is not one of {', '.join(POINTS)}")
    if fields["kind"] not in KINDS:
        raise UserError(f"{ENV}: kind='{fields['kind']}' is not one of {', '.join(KINDS)}")
    return Fault(rank=rank, at=fields["at"], kind=fields["kind"])


class Injector:
    """`injector(point)` fails this rank the first time it reaches the chosen point."""

    def __init__(self, fault: Fault | None, rank: int, device):
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.rank = rank
        self.device = device

    def __call__(self, point: str) -> None:
        if self.fault is None or point != self.fault.at:
            return
        kind, self.fault = self.fault.kind, None
        print(f"gptbench: rank {self.rank}: {ENV}: injecting {kind} at {point}",
              file=sys.stderr, flush=True)
        if kind == "crash":
            raise RuntimeError(f"injected crash at {point} ({ENV})")
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        import torch

        message = f"injected out of memory at {point} ({ENV})"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            try:
                torch.empty(free * 2, dtype=torch.uint8, device=self.device)  # a real CUDA OOM
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(f"{message}: {e}") from e
        raise torch.OutOfMemoryError(message)


def from_env(rank: int, device) -> Injector:
    return Injector(parse(os.environ.get(ENV)), rank, device)
