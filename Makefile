# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch and torchvision first, as a matched pair: timm imports torchvision, and an
# unmatched pair either fails to import or makes pip swap torch underneath.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PAIR)
	touch $@

$(VENV)/.installed: setup.py $(VENV)/.torch
	$(BIN)/pip install -q -e ".[dev]" $(TORCH_PAIR)
	touch $@

install: $(VENV)/.installed

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

# A fresh run each time (an existing output/demo would otherwise be resumed, already finished).
demo: install
	rm -rf output/demo
	OMP_NUM_THREADS=2 $(BIN)/python run_pretrain.py --config configs/demo.yaml

bench: install
	$(BIN)/python tools/bench_masking.py

clean:
	rm -rf $(VENV) output
