# Set-up is two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-demo lint bench clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip >/dev/null
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhflab run --config configs/demo.yaml --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The failure-mode demonstrations at the demo's size (about 9 minutes on 2 cores).
test-demo: $(STAMP)
	$(BIN)/python -m pytest -q -m demo tests

lint: $(STAMP)
	$(BIN)/ruff check .

# Peer benchmarks against TRL (installs it into .venv-bench once); not part of `make test`.
# e.g. make bench BENCH_ARGS="--stages sft,dpo --repeats 5"
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf runs build *.egg-info src/*.egg-info
