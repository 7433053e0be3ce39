"""How the visible GPUs reach each other, and what NCCL will do about it (`gptbench diagnose`).

Facts gathered (each None with the reason where it cannot be read):
- P2P: `torch.cuda.can_device_access_peer(i, j)` for every pair of visible GPUs;
- links: `nvidia-smi topo -m`'s GPU x GPU matrix: NV# (a bonded set of # NVLinks), PIX (at
  most one PCIe bridge), PXB (several PCIe bridges), PHB (through a PCIe host bridge, i.e.
  the CPU), NODE (between host bridges of one NUMA node), SYS (across NUMA nodes);
- IOMMU: /sys/class/iommu holds a unit when the kernel runs one (VT-d / AMD-Vi);
- ACS: `lspci -vvv`'s `ACSCtl:` lines (readable as root only): `SrcValid+` on a bridge
  redirects peer traffic up to the root complex.
NCCL's P2P transport copies directly between GPUs (NVLink or PCIe); without P2P it goes
through host memory (its SHM transport). With ACS or an IOMMU redirecting PCIe peer traffic,
P2P can be slow or hang in the first collective; NCCL_P2P_DISABLE=1 then makes NCCL use host
memory instead (NCCL's troubleshooting guide). NCCL_P2P_LEVEL sets the farthest link
(NVL, PIX, PXB, PHB, SYS) over which it uses P2P.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

PCIE_LINKS = ("PIX", "PXB", "PHB", "NODE", "SYS")
THROUGH_CPU = ("PHB", "NODE", "SYS")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_topo_matrix(text: str) -> dict[tuple[int, int], str]:
    """{(i, j): link} of the GPU x GPU cells of `nvidia-smi topo -m` (NVML's GPU indices)."""
    lines = [ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header = next((line for line in lines if re.match(r"^\s+GPU0\b", line)), None)
    if header is None:
        return {}
    gpus = [int(name[3:]) for name in header.split() if re.fullmatch(r"GPU\d+", name)]
    out = {}
    for line in lines:
        cells = line.split()
        if not cells or not re.fullmatch(r"GPU\d+", cells[0]):
            continue
        source = int(cells[0][3:])
        for target, cell in zip(gpus, cells[1:1 + len(gpus)]):
            if target != source:
                out[(source, target)] = cell
    return out


def topo_matrix(run=subprocess.run) -> tuple[dict | None, str | None]:
    """(links, None) from `nvidia-smi topo -m`, or (None, why not)."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not on PATH"
    try:
        out = run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"nvidia-smi topo -m failed: {error}"
    links = parse_topo_matrix(out.stdout) if out.returncode == 0 else {}
    if not links:
        return None, (f"nvidia-smi topo -m gave no GPU matrix (exit {out.returncode}: "
                      f"{(out.stderr or out.stdout).strip()[:120]})")
    return links, None


def iommu_state(root: str = "/sys/class/iommu") -> tuple[bool | None, str]:
    """(IOMMU on?, how we know)."""
    if not os.path.isdir(root):
        return None, f"{root} absent: cannot tell"
    units = sorted(os.listdir(root))
    return bool(units), (f"{root}: {', '.join(units)}" if units else f"{root} is empty")


def acs_state(lspci_text: str | None) -> tuple[bool | None, str]:
    """(ACS redirecting peer traffic on some bridge?, how we know) from `lspci -vvv`."""
    if lspci_text is None:
        return None, "lspci not on PATH"
    controls = [line for line in lspci_text.splitlines() if "ACSCtl:" in line]
    if not controls:
        if "access denied" in lspci_text:
            return None, "lspci cannot read PCIe capabilities without root"
        return False, "no bridge reports ACS control"
    on = [line for line in controls if "SrcValid+" in line]
    return bool(on), f"{len(on)} of {len(controls)} ACS controls with SrcValid+ (lspci -vvv)"


def read_lspci(run=subprocess.run) -> str | None:
    if shutil.which("lspci") is None:
        return None
    try:
        return run(["lspci", "-vvv"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def route_lines(count: int, p2p: dict[tuple[int, int], bool | None],
                links: dict[tuple[int, int], str] | None, iommu: bool | None,
                acs: bool | None) -> tuple[list[str], list[str]]:
    """(one line per GPU pair: link, P2P and NCCL's route; advice lines). Pairs are local
    CUDA indices; `links` must already be in that numbering (CUDA_DEVICE_ORDER=PCI_BUS_ID
    and no CUDA_VISIBLE_DEVICES reordering), else None."""
    lines, advice = [], []
    host_memory, redirected = [], []
    for i in range(count):
        for j in range(i + 1, count):
            link = (links or {}).get((i, j))
            access = p2p.get((i, j))
            if access is False or p2p.get((j, i)) is False:
                route = "no P2P: NCCL goes through host memory (SHM)"
                host_memory.append((i, j))
            elif link is not None and link.startswith("NV"):
                route = "P2P over NVLink"
            elif access and link in THROUGH_CPU:
                route = (f"P2P through the CPU ({link}); NCCL may use host memory instead "
                         "(NCCL_P2P_LEVEL)")
            elif access:
                route = "P2P over PCIe" if link in PCIE_LINKS else "P2P"
            else:
                route = "P2P unknown"
            if access and link in PCIE_LINKS and (iommu or acs):
                redirected.append((i, j))
            lines.append(f"cuda:{i} <-> cuda:{j}: link {link or 'unknown'}, P2P "
                         f"{ {True: 'yes', False: 'no', None: 'unknown'}[access] }: {route}")
    if host_memory:
        pairs = ", ".join(f"cuda:{i}-cuda:{j}" for i, j in host_memory)
        advice.append(f"NCCL will route {pairs} through host memory (no P2P, as on consumer "
                      "PCIe boards such as the RTX 3080): expect collectives several times "
                      "slower than P2P; tensor parallelism suffers most")
    if redirected:
        why = " and ".join(w for w, on in (("an IOMMU", iommu), ("PCIe ACS", acs)) if on)
        advice.append(f"{why} may redirect PCIe peer traffic through the root complex: if the "
                      "first NCCL collective hangs or P2P is slow, set NCCL_P2P_DISABLE=1 "
                      "(NCCL then uses host memory), or disable ACS / use iommu=pt")
    return lines, advice
