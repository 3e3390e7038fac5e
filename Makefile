# The commands: `make demo`, `make test` (everything) and `make test-fast` (the spec language,
# graph, numerics and report: under a minute; markers in tests/conftest.py). Each sets up .venv
# on first use.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
# The demo's independent nodes (attacks, evaluations, the two unlearning rows) run in parallel.
WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast fuzz lint format setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/resalign run specs/digits_demo.yaml --workers $(WORKERS)
	$(BIN)/resalign report specs/digits_demo.yaml --all-steps

# Two or more pytest workers (pytest-xdist; one torch thread each, tests/conftest.py): the whole
# suite took 255 s on this idle 2-core machine with two workers, against 729 s serially
# (measured while other jobs shared the cores) and 797 s in CI's last serial run.
test: $(STAMP)
	$(BIN)/ruff check resalign tests
	$(BIN)/ruff format --check resalign tests
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 tests

test-fast: $(STAMP)
	$(BIN)/ruff check resalign tests
	$(BIN)/python -m pytest -q -m fast tests

# The long random fuzz run of the spec language, recorded in docs/fuzz.md.
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	PYTHON=$(BIN)/python scripts/fuzz_specs.sh $(FUZZ_EXAMPLES)

format: $(STAMP)
	$(BIN)/ruff format resalign tests
	$(BIN)/ruff check --fix resalign tests

clean:
	rm -rf $(VENV)
