"""Fault injection for tests and users: GPTBENCH_FAULT=rank=R,at=POINT,kind=KIND.

POINT is load, prefill or decode (the first time that rank reaches it); KIND is crash (an
exception), hang (sleep until killed) or oom (the device's out-of-memory error: a real
CUDA OOM on GPUs, torch.OutOfMemoryError raised on CPU).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from gptbench.errors import UserError

POINTS = ("load", "prefill", "decode")
KINDS = ("crash", "hang", "oom")
ENV = "GPTBENCH_FAULT"


@dataclass(frozen=True)
class Fault:
    rank: int
    at: str
    kind: str


def parse(spec: str | None) -> Fault | None:
    if not spec:
        return None
    try:
        fields = dict(part.split("=", 1) for part in spec.split(","))
        fault = Fault(rank=int(fields.pop("rank")), at=fields.pop("at"), kind=fields.pop("kind"))
    except (KeyError, ValueError):
        raise UserError(f"{ENV}='{spec}': expected rank=R,at=POINT,kind=KIND") from None
    if fields:
        raise UserError(f"{ENV}: unknown field '{next(iter(fields))}'")
    if fault.at not in POINTS:
        raise UserError(f"{ENV}: at='{fault.at}' is not one of {', '.join(POINTS)}")
    if fault.kind not in KINDS:
        raise UserError(f"{ENV}: kind='{fault.kind}' is not one of {', '.join(KINDS)}")
    return fault


class Injector:
    """`injector(point)` fails this rank the first time it reaches the chosen point."""

    def __init__(self, fault: Fault | None, rank: int, device: torch.device):
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.device = device

    def __call__(self, point: str) -> None:
        if self.fault is None or point != self.fault.at:
            return
        kind, self.fault = self.fault.kind, None
        if kind == "crash":
            raise RuntimeError(f"injected crash at {point} ({ENV})")
        if kind == "hang":
            while True:
                time.sleep(3600)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            torch.empty(free * 2, dtype=torch.uint8, device=self.device)  # a real CUDA OOM
        raise torch.OutOfMemoryError(f"injected out of memory at {point} ({ENV})")


def from_env(rank: int, device: torch.device) -> Injector:
    return Injector(parse(os.environ.get(ENV)), rank, device)
