# Quick start:  make demo   (set up, fetch the offline demo model, convert it)
#               make test   (set up, run the test suite)
#               make bench  (set up, run the benchmarks at small sizes into runs/bench)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m distill.assets
	touch $@

demo: setup
	$(BIN)/distill convert demo --config configs/demo-cpu.yaml --out $(OUT) --overwrite

test: setup
	$(BIN)/pytest -q -n 2

bench: setup
	$(BIN)/python -m benchmarks --out runs/bench --quick

clean:
	rm -rf $(VENV) runs
