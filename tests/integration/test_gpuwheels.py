"""What `make gpu-check` installs on an offline GPU machine, decided against a fake wheel
folder and a fake installed set (gptbench/gpuwheels.py); and that `make gpu-wheels` is a
real target."""
import subprocess
import sys
import zipfile

import pytest
from packaging import tags

from gptbench import gpuwheels

PY312 = set(tags.cpython_tags(python_version=(3, 12), platforms=list(gpuwheels.PLATFORMS))) | \
    set(tags.compatible_tags(python_version=(3, 12), platforms=list(gpuwheels.PLATFORMS)))
PINS = {"transformers": "5.24.0", "huggingface-hub": "2.4.0", "tokenizers": "0.23.3",
        "deepspeed": "0.19.8", "numpy": "2.4.6"}


def wheel(folder, filename, requires=()):
    """A wheel file with just enough METADATA to be read."""
    path = folder / filename
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s" % (
                       name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)))
    return str(path)


@pytest.fixture
def folder(tmp_path):
    paths = [
        wheel(tmp_path, "transformers-5.24.0-py3-none-any.whl",
              ["huggingface-hub<3,>=2.0", "regex>=2025.10.22", "numpy>=1.17"]),
        wheel(tmp_path, "transformers-5.17.0-py3-none-any.whl"),
        wheel(tmp_path, "huggingface_hub-2.4.0-py3-none-any.whl", ["httpx2>=2.16"]),
        wheel(tmp_path, "httpx2-2.16.2-py3-none-any.whl"),
        wheel(tmp_path, "regex-2026.11.19-cp312-cp312-manylinux_2_17_x86_64.whl"),
        wheel(tmp_path, "regex-2026.11.19-cp311-cp311-manylinux_2_17_x86_64.whl"),
        wheel(tmp_path, "deepspeed-0.19.8-py3-none-any.whl", ["hjson", "pydantic>=2.0"]),
        wheel(tmp_path, "hjson-3.1.0-py3-none-any.whl"),
        wheel(tmp_path, "pydantic-2.14.4-py3-none-any.whl"),
        wheel(tmp_path, "numpy-2.4.6-cp312-cp312-manylinux_2_17_x86_64.whl"),
        wheel(tmp_path, "rich-15.0.0-py3-none-any.whl"),
    ]
    (tmp_path / "notes.txt").write_text("not a wheel")
    return paths + [str(tmp_path / "notes.txt")]


def decide(folder, installed):
    requires = {p: gpuwheels.wheel_requires(p) for p in folder if p.endswith(".whl")}
    return {f"{d.name}-{d.version}" if d.version else d.name: (d.install, d.reason)
            for d in gpuwheels.plan(folder, installed, PINS, PY312, requires)}


def test_enforced_pins_replace_other_versions(folder):
    got = decide(folder, {"transformers": "5.17.0", "huggingface-hub": "1.33.0",
                          "numpy": "2.5.2", "regex": "2026.1.1", "rich": "14.0.0"})
    assert got["transformers-5.24.0"] == (True, "pinned 5.24.0, installed 5.17.0")
    assert got["transformers-5.17.0"] == (False, "pinned at 5.24.0")
    assert got["huggingface-hub-2.4.0"][0] and got["deepspeed-0.19.8"][0]


def test_unenforced_packages_only_when_missing_or_too_old(folder):
    got = decide(folder, {"numpy": "2.5.2", "regex": "2024.1.1", "rich": "14.0.0",
                          "hjson": "3.1.0"})
    assert got["numpy-2.4.6"] == (False, "2.5.2 already installed")  # never shadow torch's numpy
    assert got["rich-15.0.0"] == (False, "14.0.0 already installed")
    assert got["hjson-3.1.0"] == (False, "3.1.0 already installed")
    assert got["pydantic-2.14.4"] == (True, "missing")
    assert got["httpx2-2.16.2"] == (True, "missing")
    install, reason = got["regex-2026.11.19"]
    assert install and "transformers needs regex>=2025.10.22" in reason


def test_wheels_that_do_not_fit_this_python_are_skipped(folder):
    got = {d.path.rsplit("/", 1)[-1]: d for d in gpuwheels.plan(folder, {}, PINS, PY312, {})}
    d = got["regex-2026.11.19-cp311-cp311-manylinux_2_17_x86_64.whl"]
    assert not d.install and "does not fit" in d.reason
    assert got["regex-2026.11.19-cp312-cp312-manylinux_2_17_x86_64.whl"].install
    assert got["notes.txt"].reason == "not a wheel"


def test_nothing_to_do_when_all_is_there(folder):
    have = {"transformers": "5.24.0", "huggingface-hub": "2.4.0", "deepspeed": "0.19.8",
            "numpy": "2.5.2", "regex": "2026.11.19", "httpx2": "2.16.2", "hjson": "3.1.0",
            "pydantic": "2.14.4", "rich": "15.0.0"}
    assert not any(install for install, _ in decide(folder, have).values())


def test_mismatches_name_every_enforced_package_off_its_pin():
    got = gpuwheels.mismatches(PINS, {"transformers": "5.17.0", "huggingface-hub": "2.4.0",
                                      "deepspeed": "0.19.8"})
    assert got == ["transformers: 5.17.0, pinned 5.24.0", "tokenizers: missing, pinned 0.23.3"]


def test_install_one_wheel_at_a_time_into_a_target(tmp_path):
    """A real pip install of a py3 wheel from the folder; a wheel for another Python is
    skipped and the run goes on."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    path = wheel(wheels, "gbfake-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("gbfake/__init__.py", "VALUE = 1\n")
        z.writestr("gbfake-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gbfake-1.0.dist-info/RECORD", "")
    wheel(wheels, "gbother-1.0-cp27-cp27mu-manylinux1_x86_64.whl")
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "gptbench.gpuwheels", "install", str(wheels),
                          str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (target / "gbfake" / "__init__.py").exists()
    assert "skip gbother-1.0-cp27" in out.stdout


def test_make_gpu_wheels_is_a_real_target():
    out = subprocess.run(["make", "-n", "gpu-wheels"], capture_output=True, text=True)
    assert "gptbench.gpuwheels download .whl" in out.stdout
