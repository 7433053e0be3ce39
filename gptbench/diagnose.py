"""`gptbench diagnose`: can this machine run the GPU suite, and if not, why not.

Reports the software builds, the driver and GPUs NVML sees, how CUDA_VISIBLE_DEVICES maps
local device indices to physical GPUs, peer-to-peer access and NVLink between them, the
PCIe links, IOMMU and ACS, and whether NCCL will go through host memory (gpulinks.py), and
whether DeepSpeed's inference kernels can be built. Every probe catches its own failure and
reports it as a line of text: the diagnosis must not crash on the machines it is for.

Exit code: 0 when the GPUs are usable or when there is no GPU at all (CPU runs are a
supported mode, said plainly); 1 when something blocks GPU runs that the user can fix
(DeepSpeed does not import, GPUs present but torch cannot use them, a CUDA_VISIBLE_DEVICES
entry that names no GPU).
"""

import os
import platform
import shutil

import pynvml
import torch

from gptbench.envinfo import nccl_version, package_version
from gptbench.errors import UserError
from gptbench.trackers.gpu_util import no_nvml_reason, nvml_handle, physical_gpu_id

GIB_BYTES = 1024**3


class Report:
    def __init__(self):
        self.lines: list[str] = ["gptbench diagnose"]
        self.problems: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(title)

    def item(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.item(f"PROBLEM: {text}")


def diagnose(hostfile: str | None = None) -> tuple[str, int]:
    report = Report()
    _software(report)
    nvml_gpu_count = _nvml(report)
    if nvml_gpu_count == 0 and not torch.cuda.is_available():
        report.section("GPUs")
        report.item("no NVIDIA GPU found: gptbench runs on CPU only here (gloo backend;")
        report.item("make demo, make bench-cpu). The GPU suite (make bench-*gpu*) needs CUDA.")
    elif not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        report.problem(f"NVML sees {nvml_gpu_count} GPU(s) but torch.cuda.is_available() is "
                       f"False (torch {torch.__version__}, {build})")
    else:
        _visible_gpus(report, nvml_gpu_count > 0)
        _peer_access(report)
    _inference_ops(report)
    if hostfile:
        from gptbench.hostcheck import check_hosts

        check_hosts(report, hostfile)
    verdict = ("; ".join(report.problems) if report.problems
               else "GPU suite can run" if torch.cuda.is_available() else "no GPU found, CPU runs only")
    report.lines.append(f"verdict: {verdict}")
    return "\n".join(report.lines) + "\n", 1 if report.problems else 0


def _software(report: Report) -> None:
    report.section("software")
    report.item(f"python {platform.python_version()}")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    report.item(f"torch {torch.__version__} ({build}), "
                f"torch.cuda.is_available() = {torch.cuda.is_available()}")
    nccl = nccl_version() if torch.cuda.is_available() else None
    report.item(f"NCCL (bundled with torch) {nccl}")
    try:
        import deepspeed
        report.item(f"deepspeed {deepspeed.__version__}")
    except Exception as error:  # a broken install raises anything from its import chain
        report.problem(f"deepspeed does not import: {type(error).__name__}: {error}")
    report.item(f"transformers {package_version('transformers')}")


def _nvml(report: Report) -> int:
    """Driver and physical GPUs as NVML sees them; returns how many (0 without a driver)."""
    report.section("driver and physical GPUs (NVML)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        report.item(f"NVML unavailable: {no_nvml_reason(error)}")
        return 0
    try:
        cuda_driver = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12040 for 12.4
        report.item(f"driver {pynvml.nvmlSystemGetDriverVersion()}, "
                    f"supports CUDA up to {cuda_driver // 1000}.{cuda_driver % 1000 // 10}")
        count = pynvml.nvmlDeviceGetCount()
        for index in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            total_gib = pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB_BYTES
            report.item(f"[{index}] {pynvml.nvmlDeviceGetName(handle)}, {total_gib:.1f} GiB, "
                        f"{pynvml.nvmlDeviceGetUUID(handle)}, NVLink: {_nvlink(handle)}")
        if count == 0:
            report.item("driver loaded, but it reports no GPU")
        return count
    except pynvml.NVMLError as error:
        report.item(f"NVML query failed: {error}")
        return 0
    finally:
        pynvml.nvmlShutdown()


def _nvlink(handle) -> str:
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
        except pynvml.NVMLError_NotSupported:
            break  # past the last link, or a PCIe-only GPU
        except pynvml.NVMLError as error:
            return f"unknown ({error})"
    return f"{active} active link(s)"


def _visible_gpus(report: Report, have_nvml: bool) -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = os.environ.get("CUDA_DEVICE_ORDER", "(unset: fastest first)")
    report.section(f"visible to torch: {torch.cuda.device_count()} GPU(s), "
                   f"CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'}, "
                   f"CUDA_DEVICE_ORDER={order}")
    if have_nvml:
        pynvml.nvmlInit()
    try:
        for local_index in range(torch.cuda.device_count()):
            report.item(_mapping_line(report, local_index, visible, have_nvml))
    finally:
        if have_nvml:
            pynvml.nvmlShutdown()


def _mapping_line(report: Report, local_index: int, visible: str | None, have_nvml: bool) -> str:
    torch_name = torch.cuda.get_device_name(local_index)
    try:
        physical_id = physical_gpu_id(local_index, visible)
    except UserError as error:
        report.problem(str(error))
        return f"cuda:{local_index} {torch_name} -> ?"
    if not have_nvml:
        return f"cuda:{local_index} {torch_name} -> physical {physical_id} (NVML unavailable)"
    try:
        handle = nvml_handle(physical_id)
        nvml_index, nvml_name = pynvml.nvmlDeviceGetIndex(handle), pynvml.nvmlDeviceGetName(handle)
    except (UserError, pynvml.NVMLError) as error:
        report.problem(f"CUDA_VISIBLE_DEVICES entry {physical_id!r}: {error}")
        return f"cuda:{local_index} {torch_name} -> ?"
    line = f"cuda:{local_index} {torch_name} -> NVML [{nvml_index}] {nvml_name}"
    if nvml_name != torch_name:
        line += " (names differ: set CUDA_DEVICE_ORDER=PCI_BUS_ID so indices agree)"
    return line


def _peer_access(report: Report) -> None:
    """P2P between every pair of visible GPUs, their link, and NCCL's route (gpulinks)."""
    from gptbench import gpulinks

    count = torch.cuda.device_count()
    if count < 2:
        return
    report.section("peer-to-peer access (torch.cuda.can_device_access_peer)")
    p2p = {}
    for source in range(count):
        peers = []
        for target in range(count):
            if target == source:
                continue
            try:
                p2p[(source, target)] = torch.cuda.can_device_access_peer(source, target)
                access = "yes" if p2p[(source, target)] else "no"
            except RuntimeError as error:
                p2p[(source, target)] = None
                access = f"unknown ({error})"
            peers.append(f"cuda:{target} {access}")
        report.item(f"cuda:{source} -> " + ", ".join(peers))
    links, why = gpulinks.topo_matrix()
    links, why = (_local_links(links, count), why) if links else (None, why)
    if links is None and why is None:
        why = "cannot map CUDA's device indices to nvidia-smi's (NVML) indices"
    iommu, iommu_how = gpulinks.iommu_state()
    acs, acs_how = gpulinks.acs_state(gpulinks.read_lspci())
    report.section("links and NCCL's route (nvidia-smi topo -m, IOMMU, PCIe ACS)")
    report.item(f"links: {'nvidia-smi topo -m' if links else 'null (' + why + ')'}")
    report.item(f"IOMMU: {_tri(iommu)} ({iommu_how}); ACS: {_tri(acs)} ({acs_how})")
    lines, advice = gpulinks.route_lines(count, p2p, links, iommu, acs)
    for line in lines + [f"NOTE: {a}" for a in advice]:
        report.item(line)


def _tri(value) -> str:
    return {True: "on", False: "off", None: "unknown"}[value]


def _local_links(links: dict, count: int) -> dict | None:
    """nvidia-smi's (NVML index) links in local CUDA indices, or None if unmappable."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        index = [pynvml.nvmlDeviceGetIndex(nvml_handle(physical_gpu_id(i, visible)))
                 for i in range(count)]
    except (UserError, pynvml.NVMLError):
        return None
    finally:
        pynvml.nvmlShutdown()
    return {(i, j): links[(index[i], index[j])] for i in range(count) for j in range(count)
            if i != j and (index[i], index[j]) in links}


def _inference_ops(report: Report) -> None:
    report.section("DeepSpeed inference kernels (InferenceBuilder, for engine.kernel_inject)")
    if not torch.cuda.is_available():
        report.item("not applicable: no CUDA")
        return
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import InferenceBuilder
        compatible = InferenceBuilder().is_compatible(verbose=False)
        prebuilt = installed_ops.get("transformer_inference", False)
    except Exception as error:  # the builder probes nvcc and the toolkit, failing many ways
        report.item(f"cannot tell: {type(error).__name__}: {error}")
        return
    how = "prebuilt" if prebuilt else (
        f"JIT-built on first use with nvcc ({shutil.which('nvcc') or 'nvcc not on PATH'})")
    report.item(f"compatible: {'yes' if compatible else 'no'}; {how}")


def main(a) -> int:
    if not a.comm:
        text, code = diagnose(hostfile=a.hostfile)
        print(text.rstrip("\n"))
        return code
    from gptbench import diagnose_comm, limits, results

    worlds = tuple(limits.ascii_int(x.strip()) for x in a.comm_ranks.split(","))
    if None in worlds:
        raise UserError(f"--comm-ranks: expected world sizes like 2,4, got '{a.comm_ranks[:40]}'")
    for world in worlds:  # every world size is that many processes on this machine
        limits.check_local_ranks("--comm-ranks", world)
    if a.comm_threads is not None and a.comm_threads < 1:
        raise UserError(f"--comm-threads: must be >= 1, got {a.comm_threads}")
    if a.comm_threads is not None:
        limits.check_threads("--comm-threads", a.comm_threads)
    limits.check_path("--out", a.out)
    if os.path.exists(a.out) and os.path.isdir(a.out):
        raise UserError(f"--out {a.out}: is a directory")
    problem = limits.writable_folder_problem(os.path.dirname(os.path.abspath(a.out)))
    if problem:
        raise UserError(f"--out {a.out}: cannot create it: {problem}")
    data = diagnose_comm.measure_comm(worlds, a.comm_threads)
    results.write_json_atomic(a.out, data)
    print(diagnose_comm.format_comm(data), end="")
    print(f"written: {a.out} (gptbench plan --comm-file {a.out})")
    return 0
