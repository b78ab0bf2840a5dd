# lapo: the two commands a new machine needs are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-quick test test-fast lint format bench clean

# --retries 1: where download.pytorch.org (the CPU index in requirements-cpu.txt) cannot be
# reached, pip finds a local wheel at once instead of retrying every lookup for a minute.
$(STAMP): pyproject.toml requirements-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --retries 1 -r requirements-cpu.txt
	$(BIN)/pip install --quiet -e '.[envs,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lapo demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(BIN)/lapo demo --quick $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check lapo data_prep tests benchmarks experiments
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lapo data_prep tests benchmarks experiments
	$(BIN)/ruff format --check lapo data_prep tests benchmarks experiments

format: $(STAMP)
	$(BIN)/ruff format lapo data_prep tests benchmarks experiments
	$(BIN)/ruff check --fix lapo data_prep tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
