# gptbench: `make demo` (the CPU suite + report) and `make test` work on a machine with
# nothing but Python and the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.gptbench-installed
TORCH_CPU ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
GPTBENCH := $(PY) -m gptbench.cli
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# One row of the GPU suite each: bench-2gpu-dp ... bench-4gpu-full (suite ids 2gpu-dp ...).
GPU_ROWS := $(foreach n,2 4,$(foreach s,dp tp pp full,bench-$(n)gpu-$(s)))

.PHONY: install lint test test-fast test-multinode demo report bench-cpu bench-1gpu bench-all gpu-check gpu-wheels diagnose clean \
        bench-emulate bench-emulate-cpu \
        $(GPU_ROWS)

install: $(STAMP)
	@$(PY) -c "from importlib.metadata import version as v; print('installed in $(VENV): torch', v('torch'), '| deepspeed', v('deepspeed'), '| transformers', v('transformers'), '| gptbench', v('gptbench'))"

# torch first: a GPU machine keeps the CUDA torch it has (the venv sees the system's
# packages there); elsewhere the tested CPU build, never an unpinned multi-GB CUDA one.
# DeepSpeed is an sdist: build it against that torch, with no ops compiled ahead of time.
$(STAMP): setup.cfg constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(if $(HAS_GPU),--system-site-packages) $(VENV)
	$(PIP) install setuptools wheel packaging numpy -c constraints.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch$(if $(HAS_GPU),,==$(TORCH_CPU))
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation -c constraints.txt deepspeed
	$(PIP) install -c constraints.txt -e ".[test]"
	@touch $@

# pyflakes, import order, bugbear and syntax errors (pyproject.toml's [tool.ruff]).
lint: install
	$(PY) -m ruff check gptbench tests launch

test: lint
	$(PY) -m pytest -q --durations=15 tests

# The unit tier (tests/unit/: one process, no launch, no compilation): under a minute on 2 cores.
test-fast: install
	$(PY) -m pytest -q --durations=5 tests/unit

# DeepSpeed's multi-node launcher on two loopback "hosts" of this machine (its own sshd on
# 127.0.0.1/127.0.0.2, throw-away keys; installs openssh-server and pdsh when missing).
test-multinode: install
	bash scripts/multinode/test.sh

demo: install
	$(GPTBENCH) suite deepspeed_configs/demo-cpu.yaml

report: install
	$(GPTBENCH) report $(or $(DIR),reports/demo)

bench-cpu: install
	$(GPTBENCH) bench-cpu

bench-1gpu: install
	$(GPTBENCH) suite deepspeed_configs/suite-gpu.yaml --only 1gpu-dp

# A static pattern rule: make never searches implicit (`bench-4gpu-%:`) rules for .PHONY
# targets, so such a rule did nothing ("Nothing to be done").
$(GPU_ROWS): bench-%: install
	$(GPTBENCH) suite deepspeed_configs/suite-gpu.yaml --resume --only $*

bench-all: install
	$(GPTBENCH) suite deepspeed_configs/suite-gpu.yaml

# The 9-row GPU suite emulated on this machine's one GPU (gptbench/emulate.py): every rank
# role timed alone under a fake process group, collectives at INTERCONNECT's latencies
# (docs/interconnects.md); records reports/gpu/runs/emu-*.json beside the measured rows.
INTERCONNECT ?= nvlink4
bench-emulate: install
	$(GPTBENCH) suite deepspeed_configs/suite-gpu.yaml --emulate --interconnect $(INTERCONNECT) \
		$(if $(WEIGHTS),--set model.weights=$(WEIGHTS))

# On CPU, where both sides can be measured: each ok demo row's real multi-process run beside
# its emulated prediction (latencies from this machine's gloo), measured_over_emulated per row.
bench-emulate-cpu: install
	$(GPTBENCH) bench-emulate-cpu

diagnose: install
	$(GPTBENCH) diagnose

# No `install` prerequisite: a lent GPU machine may have no network; the script installs
# what is missing from wheels carried in .whl/.
gpu-check:
	bash scripts/gpu_check.sh

# Here, with network: the wheels `gpu-check` needs on an offline GPU machine with Python
# 3.12 and a CUDA torch (transformers & co at our pins, DeepSpeed built as a pure-Python
# wheel), into .whl/ (gptbench/gpuwheels.py).
gpu-wheels: install
	$(PY) -m gptbench.gpuwheels download .whl

clean:
	rm -rf $(VENV) reports/*/ *.egg-info
