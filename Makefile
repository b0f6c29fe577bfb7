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

# torch first (the CPU wheel on this machine; anything else would pull a multi-GB CUDA build), then the package
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[train,rewards,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowgrpo train --config configs/tiny_cpu.yaml output_dir=$(DEMO_DIR)
	@echo "results: $(DEMO_DIR)/metrics.jsonl, image grids in $(DEMO_DIR)/samples/, model in $(DEMO_DIR)/final/"
	@echo "MLflow (embedded sqlite): $(BIN)/flowgrpo mlflow-ui   then open http://127.0.0.1:5000"

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/flowgrpo bench rollout --guidance 4.5
	$(BIN)/flowgrpo bench rollout --guidance 1.0
	$(BIN)/flowgrpo bench train
	$(BIN)/flowgrpo bench train --window 3

clean:
	rm -rf runs .pytest_cache
