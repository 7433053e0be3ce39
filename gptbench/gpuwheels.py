"""Wheels for an offline GPU machine: `make gpu-wheels` fills `.whl/`; `make gpu-check`
(scripts/gpu_check.sh) installs from it what that machine lacks, then checks what imports.

A lent GPU machine has a CUDA torch and the usual scientific stack, but no network and not
our pins. What gptbench's correctness depends on is enforced: transformers (the GPT-2 code
and its static cache), huggingface_hub and tokenizers (what that transformers was tested
with) and DeepSpeed (AutoTP, PipelineModule). Everything else is installed only when
missing: replacing a machine's numpy or typing_extensions would shadow what its torch was
built against. DeepSpeed travels as a pure-Python wheel built here (`DS_BUILD_OPS=0`: ops
JIT-compile on first use, none are needed for gptbench's paths), so nothing builds there.

Stdlib and `packaging` only: this runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENFORCED = ("transformers", "huggingface-hub", "tokenizers", "deepspeed")
# What `make gpu-wheels` fetches, with their dependencies, for the target Python; DeepSpeed
# is built here without its dependencies (torch is the machine's).
DOWNLOAD = ("transformers", "tokenizers", "huggingface-hub", "safetensors", "pydantic",
            "hjson", "py-cpuinfo", "msgpack", "einops", "ninja", "nvidia-ml-py", "psutil",
            "pyyaml", "tqdm", "jinja2")
# Present on every CUDA PyTorch image and large: never carried.
NOT_CARRIED = re.compile(r"^(numpy|torch|triton|nvidia-(?!ml-py).*|setuptools|pip)$")
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return {canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", f.read(), re.M)}


@dataclass(frozen=True)
class Decision:
    path: str
    name: str
    version: str
    install: bool
    reason: str


def _parse(path: str):
    """(name, version, tags) of a wheel file, or None for anything else."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        name, version, _, tags = parse_wheel_filename(os.path.basename(path))
    except InvalidWheelFilename:
        return None
    return canonical(name), str(version), tags


def wheel_requires(path: str) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def _unmet(name: str, version: str | None, needs: list) -> str | None:
    """Why `version` of `name` does not do for the requirements `needs`, or None."""
    for req, by in needs:
        if canonical(req.name) == name and (version is None or version not in req.specifier):
            return f"{by} needs {req}"
    return None


def plan(paths: list[str], installed: dict[str, str], pins: dict[str, str],
         supported: set, requires: dict[str, list[str]] | None = None) -> list[Decision]:
    """Which wheels to install, one decision per wheel file, with the reason.

    `installed`: {canonical name: version} on the target; `supported`: its interpreter's
    tags (packaging.tags.sys_tags()); `requires`: each wheel's Requires-Dist. A wheel is
    installed when its distribution is enforced and off its pin, missing, or installed at
    a version that a wheel being installed does not accept. At most one per distribution."""
    from packaging.requirements import Requirement

    requires = requires or {}
    fitting, decisions = {}, {}
    for path in sorted(paths):
        parsed = _parse(path)
        if parsed is None:
            decisions[path] = Decision(path, os.path.basename(path), "", False, "not a wheel")
            continue
        name, version, tags = parsed
        if not tags & supported:
            tag = sorted(str(t) for t in tags)[0]
            decisions[path] = Decision(path, name, version, False,
                                       f"tag {tag} does not fit this Python")
        elif name in ENFORCED and pins.get(name) not in (None, version):
            decisions[path] = Decision(path, name, version, False, f"pinned at {pins[name]}")
        elif name in fitting:
            decisions[path] = Decision(path, name, version, False,
                                       f"another wheel of {name} is chosen")
        else:
            fitting[name] = (path, version)
    chosen: dict[str, str] = {}
    while True:  # until no wheel being installed asks for one more
        needs = [(Requirement(r), n) for n, p in chosen.items() for r in requires.get(p, [])]
        needs = [(r, by) for r, by in needs if r.marker is None or r.marker.evaluate({"extra": ""})]
        added = {}
        for name, (path, version) in fitting.items():
            if name in chosen:
                continue
            have = installed.get(name)
            if name in ENFORCED and name in pins:
                why = None if have == pins[name] else (
                    f"pinned {pins[name]}, installed {have}" if have else f"pinned {pins[name]}, missing")
            elif have is None:
                why = "missing"
            else:
                unmet = _unmet(name, have, needs)
                why = f"installed {have}, but {unmet}" if unmet and not _unmet(name, version, needs) else None
            if why:
                added[name] = (path, why)
        if not added:
            break
        for name, (path, why) in added.items():
            chosen[name] = path
            decisions[path] = Decision(path, name, fitting[name][1], True, why)
    for name, (path, version) in fitting.items():
        if name not in chosen:
            have = installed.get(name)
            decisions[path] = Decision(path, name, version, False,
                                       f"{have} already installed" if have else "not needed")
    return [decisions[p] for p in sorted(decisions)]


def installed_versions() -> dict[str, str]:
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)  # first on sys.path wins, as import
    return out


def mismatches(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name: imports X, pinned Y' for every enforced package that is off its pin."""
    return [f"{n}: {installed.get(n) or 'missing'}, pinned {pins[n]}"
            for n in ENFORCED if n in pins and installed.get(n) != pins[n]]


def install(wheel_dir: str, target: str, python: str = sys.executable) -> int:
    from packaging.tags import sys_tags

    pins = read_pins(os.path.join(ROOT, "constraints.txt"))
    paths = [os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir)] if os.path.isdir(wheel_dir) else []
    requires = {p: wheel_requires(p) for p in paths if _parse(p)}
    for d in plan(paths, installed_versions(), pins, set(sys_tags()), requires):
        if not d.install:
            print(f"gpu-wheels: skip {os.path.basename(d.path)}: {d.reason}")
            continue
        print(f"gpu-wheels: install {os.path.basename(d.path)} ({d.reason})", flush=True)
        done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                               target, d.path])
        if done.returncode:
            print(f"gpu-wheels: installing {os.path.basename(d.path)} failed; going on",
                  file=sys.stderr)
    return 0


MODULES = {"transformers": "transformers", "huggingface-hub": "huggingface_hub",
           "tokenizers": "tokenizers", "deepspeed": "deepspeed"}


def imported_versions() -> dict[str, str]:
    """What `import` finds for the enforced packages (not what metadata claims)."""
    import importlib

    out = {}
    for name, module in MODULES.items():
        try:
            out[name] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - missing or broken: reported as missing
            continue
    return out


def verify() -> int:
    """Exit 1 with one line per package when what imports is not what gptbench pins."""
    pins = read_pins(os.path.join(ROOT, "constraints.txt"))
    wrong = mismatches(pins, imported_versions())
    for line in wrong:
        print(f"gpu-wheels: {line} (carry the pinned wheel in .whl/: make gpu-wheels)",
              file=sys.stderr)
    return 1 if wrong else 0


def download(wheel_dir: str, python: str = sys.executable) -> int:
    """Fill `wheel_dir` for a Python 3.12 x86-64 GPU machine (run where pip has network)."""
    os.makedirs(wheel_dir, exist_ok=True)
    constraints = os.path.join(ROOT, "constraints.txt")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    done = subprocess.run(pip + ["download", "-q", "--only-binary=:all:", "--python-version",
                                 TARGET_PYTHON, "--implementation", "cp", *platforms, "-d",
                                 wheel_dir, "-c", constraints, *DOWNLOAD])
    if done.returncode:
        return done.returncode
    pins = read_pins(constraints)
    built = subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                                  wheel_dir, f"deepspeed=={pins['deepspeed']}"],
                           env={**os.environ, "DS_BUILD_OPS": "0"})
    if built.returncode:
        return built.returncode
    total = 0
    for f in sorted(os.listdir(wheel_dir)):
        parsed = _parse(f)
        if parsed and NOT_CARRIED.match(parsed[0]):
            os.unlink(os.path.join(wheel_dir, f))
            continue
        total += os.path.getsize(os.path.join(wheel_dir, f))
    print(f"gpu-wheels: {len(os.listdir(wheel_dir))} wheels, {total / 2**20:.1f} MiB in {wheel_dir}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptbench.gpuwheels", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fill a wheel folder for an offline GPU machine")
    d.add_argument("wheel_dir", nargs="?", default=os.path.join(ROOT, ".whl"))
    i = sub.add_parser("install", help="install what this machine lacks from a wheel folder")
    i.add_argument("wheel_dir")
    i.add_argument("target")
    sub.add_parser("verify", help="exit 1 unless the enforced packages import at their pins")
    args = p.parse_args(argv)
    if args.command == "download":
        return download(args.wheel_dir)
    if args.command == "install":
        return install(args.wheel_dir, args.target)
    return verify()


if __name__ == "__main__":
    sys.exit(main())
