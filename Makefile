# Two commands do all set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo-out
PYTEST_ARGS ?=
DEMO_CORPUS ?= synthetic?subjects=8&runs=2&duration_s=120
DEMO_PROBE ?= synthetic?subjects=8&runs=1&duration_s=120&artifacts=false

.PHONY: venv demo test lint format bench clean

$(BIN)/brainmoe: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/brainmoe

venv: $(BIN)/brainmoe

# synthetic shards -> tiny MoE pretrained on 2 CPU ranks under DeepSpeed -> exported and
# registered in the run's own MLflow (sqlite) -> linear probe pulled back by its alias.
demo: venv
	$(BIN)/brainmoe shards build --source "$(DEMO_CORPUS)" --out $(DEMO)/shards --workers 2
	$(BIN)/brainmoe shards verify $(DEMO)/shards
	$(BIN)/brainmoe shards stats $(DEMO)/shards
	$(BIN)/brainmoe shards inspect $(DEMO)/shards --png $(DEMO)/window.png
	rm -rf $(DEMO)/pretrain
	$(BIN)/brainmoe pretrain --num-gpus 2 \
	    --config configs/pretrain/tiny.yaml data.shards=[$(DEMO)/shards] \
	    train.run_dir=$(DEMO)/pretrain register.name=brainmoe-demo
	$(BIN)/brainmoe probe --model models:/brainmoe-demo@current \
	    --tracking-uri sqlite:///$(abspath $(DEMO))/pretrain/mlflow.db --source "$(DEMO_PROBE)"
	@echo "plots: $(DEMO)/pretrain/plots/  MLflow UI: $(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(abspath $(DEMO))/pretrain/mlflow.db"

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
	$(BIN)/python bench/pretrain.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
