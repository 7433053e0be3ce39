"""Named GPU interconnects as latency tables for the one prediction path (gptbench/predict.py).

A collective of `nbytes` on `n` ranks costs `latency_us + transfer`, the alpha-beta model
NCCL's own tests report in (NCCL-tests `doc/PERFORMANCE.md`: bus bandwidth = algorithm
bandwidth x 2(n-1)/n for all-reduce, x 1 for broadcast and send/recv), so
transfer = nbytes x factor(op, n) / bus bandwidth. Each profile's figures and their sources
are in docs/interconnects.md; which are datasheet numbers and which are estimates is said
there and in `source`.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptbench.errors import UserError


@dataclass(frozen=True)
class Interconnect:
    key: str
    name: str
    latency_us: float          # one small collective (NCCL's LL protocol), estimated
    bus_bandwidth_gbps: float  # achievable all-reduce bus bandwidth, GB/s
    p2p_bandwidth_gbps: float  # one direction, one pair, GB/s
    source: str

    def lookup_us(self, op: str, group_size: int, nbytes: int) -> float:
        """Microseconds of one `op` ((op, group size, bytes) as LatencyTable.lookup_us)."""
        if op in ("p2p", "p2p_ready"):
            return self.latency_us + nbytes / (self.p2p_bandwidth_gbps * 1e3)
        if op == "barrier":  # NCCL's barrier is an all-reduce of one element
            return self.latency_us
        factor = 2 * (group_size - 1) / group_size if op == "all_reduce" else 1.0
        return self.latency_us + nbytes * factor / (self.bus_bandwidth_gbps * 1e3)


PROFILES = {p.key: p for p in (
    Interconnect("nvlink4", "NVLink 4 (H100/H200 SXM, NVSwitch)", 6.0, 370.0, 370.0,
                 "datasheet: 900 GB/s per GPU both ways (450 each way); bus bandwidth "
                 "~370 GB/s and latency ~6 us are estimates (docs/interconnects.md)"),
    Interconnect("nvlink3", "NVLink 3 (A100 SXM, NVSwitch)", 8.0, 230.0, 230.0,
                 "datasheet: 600 GB/s per GPU both ways (300 each way); bus bandwidth "
                 "~230 GB/s and latency ~8 us are estimates (docs/interconnects.md)"),
    Interconnect("nvlink-bridge", "NVLink bridge (2 cards, e.g. RTX 3090 / A6000)", 10.0,
                 45.0, 45.0,
                 "datasheet: 112.5 GB/s both ways (56 each way); 45 GB/s achievable and "
                 "~10 us latency are estimates (docs/interconnects.md)"),
    Interconnect("pcie5", "PCIe 5.0 x16 with peer-to-peer", 12.0, 45.0, 50.0,
                 "PCI-SIG: 32 GT/s x16 = 63 GB/s each way; 45-50 GB/s achievable and "
                 "~12 us latency are estimates (docs/interconnects.md)"),
    Interconnect("pcie4", "PCIe 4.0 x16 with peer-to-peer", 15.0, 22.0, 25.0,
                 "PCI-SIG: 16 GT/s x16 = 31.5 GB/s each way; 22-25 GB/s achievable and "
                 "~15 us latency are estimates (docs/interconnects.md)"),
)}


def profile(key: str) -> Interconnect:
    if key not in PROFILES:
        raise UserError(f"--interconnect: '{key}' is not one of {', '.join(PROFILES)}")
    return PROFILES[key]
