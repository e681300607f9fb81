# `make run` runs the demo, `make test` the tests; both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench chaos fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mlmirror demo

test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench_proxy

chaos: $(STAMP)
	$(BIN)/python -m loadtest.chaos

# Coverage-guided fuzzing with atheris (optional: installed here, not a test dependency); FUZZ_RUNS per harness.
# The config harness starts from the example config; its corpus grows in $(VENV)/fuzz-corpus.
FUZZ_RUNS ?= 200000
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet atheris
	$(BIN)/python tests/fuzz/fuzz_kserve.py -atheris_runs=$(FUZZ_RUNS)
	mkdir -p $(VENV)/fuzz-corpus/config && cp examples/mlmirror.yaml $(VENV)/fuzz-corpus/config/
	$(BIN)/python tests/fuzz/fuzz_config.py -atheris_runs=$(FUZZ_RUNS) $(VENV)/fuzz-corpus/config

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
