# Two commands do all set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo-out
PYTEST_ARGS ?=

.PHONY: venv demo test lint format bench clean

$(BIN)/brainmoe: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/brainmoe

venv: $(BIN)/brainmoe

demo: venv
	$(BIN)/brainmoe shards build --source "synthetic?subjects=4&runs=2&duration_s=120" --out $(DEMO)/shards --workers 2
	$(BIN)/brainmoe shards verify $(DEMO)/shards
	$(BIN)/brainmoe shards stats $(DEMO)/shards
	$(BIN)/brainmoe shards inspect $(DEMO)/shards --png $(DEMO)/window.png

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/shards.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
