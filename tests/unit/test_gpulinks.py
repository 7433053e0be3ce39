"""How GPUs reach each other and NCCL's route (gptbench diagnose), from the tools' own
output formats: no GPU needed."""
from gptbench import gpulinks

# `nvidia-smi topo -m` of a 4-GPU PCIe machine: two pairs behind switches, pairs joined at
# the CPU; colour codes as some drivers print them.
TOPO_PCIE = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tPIX\tPHB\tPHB\t0-31\t0\t\tN/A\n"
    "GPU1\tPIX\t X \tPHB\tPHB\t0-31\t0\t\tN/A\n"
    "GPU2\tPHB\tPHB\t X \tPIX\t0-31\t0\t\tN/A\n"
    "GPU3\tPHB\tPHB\tPIX\t X \t0-31\t0\t\tN/A\n"
    "\nLegend:\n\n  X    = Self\n  SYS  = Connection traversing PCIe as well as the SMP "
    "interconnect between NUMA nodes (e.g., QPI/UPI)\n  NV#  = Connection traversing a bonded "
    "set of # NVLinks\n")
TOPO_NVLINK = ("\tGPU0\tGPU1\tCPU Affinity\n"
               "GPU0\t X \tNV18\t0-47\nGPU1\tNV18\t X \t0-47\n")


def test_the_matrix_is_read_past_colour_codes_and_affinity_columns():
    links = gpulinks.parse_topo_matrix(TOPO_PCIE)
    assert links[(0, 1)] == "PIX" and links[(0, 2)] == "PHB" and links[(3, 2)] == "PIX"
    assert len(links) == 12 and (0, 0) not in links
    assert gpulinks.parse_topo_matrix(TOPO_NVLINK) == {(0, 1): "NV18", (1, 0): "NV18"}
    assert gpulinks.parse_topo_matrix("NVIDIA-SMI has failed") == {}


def test_no_p2p_routes_through_host_memory():
    """Consumer PCIe boards (RTX 3080) report no P2P: NCCL uses host memory, and says so."""
    p2p = {(0, 1): False, (1, 0): False}
    lines, advice = gpulinks.route_lines(2, p2p, {(0, 1): "PHB", (1, 0): "PHB"}, False, False)
    assert lines == ["cuda:0 <-> cuda:1: link PHB, P2P no: no P2P: NCCL goes through host "
                     "memory (SHM)"]
    assert len(advice) == 1 and "through host memory" in advice[0]
    assert "NCCL_P2P_DISABLE" not in advice[0]  # nothing to disable


def test_pcie_p2p_behind_acs_or_an_iommu_suggests_nccl_p2p_disable():
    links = gpulinks.parse_topo_matrix(TOPO_PCIE)
    p2p = {(i, j): True for i in range(4) for j in range(4) if i != j}
    lines, advice = gpulinks.route_lines(4, p2p, links, iommu=True, acs=None)
    assert "P2P over PCIe" in lines[0] and "P2P through the CPU (PHB)" in lines[1]
    assert len(lines) == 6
    assert len(advice) == 1 and "an IOMMU" in advice[0] and "NCCL_P2P_DISABLE=1" in advice[0]
    assert gpulinks.route_lines(4, p2p, links, iommu=False, acs=False)[1] == []


def test_nvlink_needs_no_advice_even_with_an_iommu():
    lines, advice = gpulinks.route_lines(2, {(0, 1): True, (1, 0): True},
                                         gpulinks.parse_topo_matrix(TOPO_NVLINK), True, True)
    assert lines == ["cuda:0 <-> cuda:1: link NV18, P2P yes: P2P over NVLink"] and advice == []


def test_unknown_facts_are_null_with_their_reason(tmp_path):
    assert gpulinks.iommu_state(str(tmp_path / "absent")) == (
        None, f"{tmp_path / 'absent'} absent: cannot tell")
    (tmp_path / "iommu").mkdir()
    assert gpulinks.iommu_state(str(tmp_path / "iommu"))[0] is False
    (tmp_path / "iommu" / "dmar0").mkdir()
    assert gpulinks.iommu_state(str(tmp_path / "iommu")) == (True, f"{tmp_path / 'iommu'}: dmar0")
    assert gpulinks.acs_state(None) == (None, "lspci not on PATH")
    assert gpulinks.acs_state("\tCapabilities: <access denied>\n")[0] is None
    on = "\t\tACSCtl:\tSrcValid+ TransBlk- ReqRedir+ CmpltRedir+ UpstreamFwd+ EgressCtrl- DirectTrans-\n"
    off = on.replace("SrcValid+", "SrcValid-")
    assert gpulinks.acs_state(on + off) == (True, "1 of 2 ACS controls with SrcValid+ (lspci -vvv)")
    assert gpulinks.acs_state(off)[0] is False


def test_without_nvidia_smi_the_links_are_null_with_the_reason(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpulinks.topo_matrix() == (None, "nvidia-smi not on PATH")
