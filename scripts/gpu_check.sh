#!/usr/bin/env bash
# `make gpu-check`: GPT-2 XL fp16 on one GPU (gptbench.gpucheck), under 8 minutes, on a
# machine that may have no network: Python wheels missing there are installed from .whl/.
#
# Exit codes: 0 when at least one row ran (targets met or not: it is a benchmark);
# 1 when nothing could be checked: no GPU (said on stderr, within a second), no CUDA
# torch, or gptbench's dependencies missing and not in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! nvidia-smi -L >/dev/null 2>&1 && [ ! -e /dev/nvidia0 ]; then
    echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi -L lists none, no /dev/nvidia0);" \
         "nothing to check. Run it on a machine with a CUDA GPU." >&2
    exit 1
fi

# The venv when it has a CUDA torch (after `make install` on a GPU machine), else python3.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
SITE=/tmp/site
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"

# A carried wheel is installed when its distribution is absent, or present at another
# version than constraints.txt pins (a preinstalled transformers 4.x must not win); a
# preinstalled CUDA torch is never replaced.
needed() {
    "$PY" - "$@" <<'EOF'
import importlib.metadata as md, os, re, sys
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("constraints.txt").read(), re.M))
pins = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
for path in sys.argv[1:]:
    name, version = re.match(r"(.+?)-(\d[^-]*?)(?:\.tar\.gz|-)", os.path.basename(path)).groups()
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        have = md.version(key)
    except md.PackageNotFoundError:
        have = None
    if have is None or (key in pins and have != pins[key] and version == pins[key]):
        print(path)
EOF
}

if [ -d .whl ]; then
    mapfile -t wheels < <(needed .whl/*.whl 2>/dev/null)
    if [ "${#wheels[@]}" -gt 0 ]; then
        echo "gpu-check: installing ${#wheels[@]} wheel(s) from .whl/ into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}" || exit 1
    fi
    mapfile -t sdists < <(needed .whl/deepspeed-*.tar.gz 2>/dev/null)
    if [ "${#sdists[@]}" -gt 0 ]; then
        echo "gpu-check: building ${sdists[0]} (DS_BUILD_OPS=0: ops JIT-compile on first use)"
        DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
            --upgrade --target "$SITE" "${sdists[0]}" || exit 1
    fi
fi

if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu-check: $PY has no torch that sees the GPU (CUDA build needed; nothing can be" \
         "downloaded here)" >&2
    exit 1
fi
if ! err=$("$PY" -c 'import deepspeed, transformers, yaml, gptbench.launcher' 2>&1); then
    echo "gpu-check: gptbench's dependencies are not importable with $PY:" \
         "$(printf '%s\n' "$err" | tail -1); carry their wheels in .whl/" >&2
    exit 1
fi
"$PY" -c 'import torch, deepspeed, transformers; print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")' 2>/dev/null
exec "$PY" -m gptbench.gpucheck --output-dir reports/gpu-check
