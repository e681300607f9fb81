# `make run` runs the demo, `make test` the tests, `make check` the fast loop; all create .venv and install what they
# need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check bench chaos explore fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo prints its dashboard's address first and keeps it up for a minute after the traffic (LINGER=0s: not).
LINGER ?= 60s
run: $(STAMP)
	$(BIN)/mlmirror demo --linger $(LINGER)

# Hypothesis runs its fixed (derandomized) examples here: the "ci" profile of tests/conftest.py.
test: lint
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

# mypy checks the package as it is installed: mlmirror is mapped from proxy/, kernels/ and protos/ (package-dir),
# which mypy cannot follow in the source tree, so a tree of links in $(TYPECHECK)/mlmirror stands for the package.
# MYPYPATH makes that tree the base of module names; the report names the repository's files.
TYPECHECK := $(VENV)/typecheck
PACKAGE_ENTRIES = $(wildcard proxy/*.py proxy/py.typed) $(filter-out proxy/__pycache__,$(patsubst %/,%,$(wildcard proxy/*/)))
typecheck: $(STAMP)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/mlmirror
	ln -s $(addprefix $(CURDIR)/,$(PACKAGE_ENTRIES) kernels protos) $(TYPECHECK)/mlmirror/
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy --cache-dir $(VENV)/mypy-cache $(TYPECHECK)/mlmirror tests loadtest > $(TYPECHECK)/report; \
	  status=$$?; sed -e 's|^$(TYPECHECK)/mlmirror/kernels/|kernels/|' -e 's|^$(TYPECHECK)/mlmirror/protos/|protos/|' \
	  -e 's|^$(TYPECHECK)/mlmirror/|proxy/|' $(TYPECHECK)/report; exit $$status

# The fast loop: lint, types and the tests that start no process (those are marked slow or process), in about a minute:
# on two pytest-xdist workers (many of the tests wait on sockets and timers), with compiled bytecode kept between
# runs even where the environment turns that off (an empty PYTHONDONTWRITEBYTECODE is off).
check: lint
	PYTHONDONTWRITEBYTECODE= HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q -n 2 --dist worksteal \
	  -m "not slow and not process"

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench_proxy

chaos: $(STAMP)
	$(BIN)/python -m loadtest.chaos

# The property tests with random examples, many more of them; what they find is replayed first on the next run.
HYPOTHESIS_TESTS := tests/test_kernels.py tests/test_config_fuzz.py tests/test_compare.py tests/test_routing.py \
	tests/test_extproc.py tests/test_handoff.py tests/test_hypothesis_profiles.py
explore: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(BIN)/python -m pytest -q $(HYPOTHESIS_TESTS)

# Random property tests (explore), then coverage-guided fuzzing with atheris (optional: installed here, not a test
# dependency); FUZZ_RUNS per harness.
# The config harness starts from the example config; its corpus grows in $(VENV)/fuzz-corpus.
FUZZ_RUNS ?= 200000
fuzz: explore
	$(BIN)/python -m pip install --quiet atheris
	$(BIN)/python tests/fuzz/fuzz_kserve.py -atheris_runs=$(FUZZ_RUNS)
	mkdir -p $(VENV)/fuzz-corpus/config && cp examples/mlmirror.yaml $(VENV)/fuzz-corpus/config/
	$(BIN)/python tests/fuzz/fuzz_config.py -atheris_runs=$(FUZZ_RUNS) $(VENV)/fuzz-corpus/config

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
