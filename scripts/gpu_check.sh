#!/usr/bin/env bash
# `make gpu-check`: GPT-2 XL fp16 on one GPU (gptbench.gpucheck) and the single-GPU proofs
# of the multi-GPU path (gptbench.gpuproofs), in one call of under 9 minutes, on a machine
# that may have no network: what it lacks comes from .whl/ (`make gpu-wheels`,
# gptbench/gpuwheels.py).
#
# Exit codes: 0 when at least one row ran (targets met or not: it is a benchmark);
# 1 when nothing could be checked: no GPU (said on stderr, within a second), no CUDA
# torch, or gptbench's pinned dependencies do not import at their pins.
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
SITE=${GPTBENCH_SITE:-/tmp/site}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"

# Enforced pins (transformers, huggingface_hub, tokenizers, deepspeed) are installed when
# off their pin; anything else only when missing or too old for what is installed; a
# wheel whose tags do not fit this Python is skipped; one pip call per wheel.
if [ -d .whl ]; then
    "$PY" -m gptbench.gpuwheels install .whl "$SITE" || exit 1
fi
if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu-check: $PY has no torch that sees the GPU (CUDA build needed; nothing can be" \
         "downloaded here)" >&2
    exit 1
fi
"$PY" -m gptbench.gpuwheels verify || exit 1
if ! err=$("$PY" -c 'import deepspeed, transformers, yaml, gptbench.launcher' 2>&1); then
    echo "gpu-check: gptbench's dependencies are not importable with $PY:" \
         "$(printf '%s\n' "$err" | tail -1); carry their wheels in .whl/ (make gpu-wheels)" >&2
    exit 1
fi
"$PY" -c 'import torch, deepspeed, transformers; print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")' 2>/dev/null
OUT=${GPU_CHECK_OUT:-reports/gpu-check}
# One call, every part bounded by `timeout` whatever it does (an NCCL hang included), its
# share of gpucheck's BUDGET_S fixed here: the single-GPU proofs of the multi-GPU path
# (gptbench/gpuproofs.py), then the rows (the rest), then, when a row ran, the 9-row GPU
# suite emulated on this one GPU (make bench-emulate: the roles it reaches within its share)
# and the compiled tensor-parallel proof under a fake process group (emulate_proof.py).
# The last two never change the exit code: they are benchmarks.
PROOF_BUDGET_S=${GPU_PROOF_BUDGET_S:-70}
EMULATE_BUDGET_S=${EMULATE_BUDGET_S:-110}
FAKEPG_BUDGET_S=${FAKEPG_PROOF_BUDGET_S:-60}
timeout -k 10 $((PROOF_BUDGET_S + 30)) "$PY" -m gptbench.gpuproofs \
    --budget-s "$PROOF_BUDGET_S" --out "$OUT/proofs.json" \
    || echo "gpu-check: the proofs stopped early (exit $?); the rows still run" >&2
ROW_BUDGET_S=$("$PY" -c "from gptbench.gpucheck import BUDGET_S; print(max(60, int(BUDGET_S) - $PROOF_BUDGET_S - $EMULATE_BUDGET_S - $FAKEPG_BUDGET_S))")
"$PY" -m gptbench.gpucheck --output-dir "$OUT" --budget-s "$ROW_BUDGET_S" "$@"
rc=$?
if [ $rc -eq 0 ]; then
    timeout -k 10 "$EMULATE_BUDGET_S" "$PY" -m gptbench.cli suite deepspeed_configs/suite-gpu.yaml \
        --emulate --interconnect "${INTERCONNECT:-nvlink4}" --output-dir "$OUT/emulated" \
        --set model.weights=random || echo "gpu-check: bench-emulate stopped (exit $?)" >&2
    timeout -k 10 "$FAKEPG_BUDGET_S" "$PY" -m gptbench.emulate_proof --device cuda \
        --out "$OUT/emulate-proof.json" || echo "gpu-check: the fake-group compile proof stopped (exit $?)" >&2
fi
exit $rc
