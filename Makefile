# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.flowgrpo-installed
DEMO_DIR ?= runs/demo
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv bench clean

include images/Makefile.images

# torch first (the CPU wheel on this machine; anything else would pull a multi-GB CUDA build), then the package
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[train,rewards,kfp,test]"
	touch $(STAMP)

venv: $(STAMP)

# the whole pipeline DAG on this machine (kfp.local): fetch -> reward server -> torchrun training -> eval ->
# gated registration in MLflow (embedded sqlite); prints each task's wall time and the registered version.
# The base model is the tiny SD3 pretrained on the shapes world (built once into ~/.cache/flowgrpo, ~16 min on
# 2 cores the first time); DEMO_PRESET=tiny_cpu runs the same DAG on a random tiny model in about a minute.
DEMO_PRESET ?= shapes_cpu
demo: $(STAMP)
	$(BIN)/flowgrpo pipeline run --local --preset $(DEMO_PRESET) --pipeline-root $(DEMO_DIR)

test: $(STAMP)
	-$(MAKE) --no-print-directory checkov-venv
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/flowgrpo bench rollout --guidance 4.5
	$(BIN)/flowgrpo bench rollout --guidance 4.5 --compile
	$(BIN)/flowgrpo bench rollout --guidance 1.0 --compile --no-baseline
	$(BIN)/flowgrpo bench train
	$(BIN)/flowgrpo bench train --compile
	$(BIN)/flowgrpo bench train --compile --window 3

clean:
	rm -rf runs .pytest_cache
