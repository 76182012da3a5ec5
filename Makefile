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
# registered in the run's own MLflow (sqlite) -> linear probe pulled back by its alias ->
# image/text/retrieval heads finetuned on it -> generate from the registered heads.
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
	    --tracking-uri sqlite:///$(abspath $(DEMO))/pretrain/mlflow.db --source "$(DEMO_PROBE)" \
	    --json $(DEMO)/probe.json
	# heads: tiny random-weight bases (nothing downloaded) -> multi-task finetune on 2 CPU
	# ranks from the registered encoder -> registered adapters -> images + captions
	rm -rf $(DEMO)/finetune $(DEMO)/generated
	$(BIN)/brainmoe finetune --num-gpus 2 --config configs/finetune/tiny.yaml \
	    data.shards=[$(DEMO)/shards] encoder.model=models:/brainmoe-demo@current \
	    tracking.tracking_uri=sqlite:///$(abspath $(DEMO))/pretrain/mlflow.db \
	    $$($(BIN)/python -m finetune.tiny $(DEMO)/bases | tail -n 1) \
	    train.run_dir=$(DEMO)/finetune register.name=brainmoe-demo-heads
	$(BIN)/brainmoe generate --model models:/brainmoe-demo-heads@current \
	    --tracking-uri sqlite:///$(abspath $(DEMO))/pretrain/mlflow.db --shards $(DEMO)/shards \
	    --keys $$($(BIN)/python -c "import json; print(*json.load(open('$(DEMO)/finetune/split.json'))['test_keys'][:3])") \
	    --out $(DEMO)/generated --num-images 2
	@echo "plots: $(DEMO)/pretrain/plots/  held-out scores: $(DEMO)/finetune/eval.json  images: $(DEMO)/generated/index.html"
	@echo "MLflow UI: $(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///$(abspath $(DEMO))/pretrain/mlflow.db"
	@$(BIN)/python -m finetune.report --probe $(DEMO)/probe.json --eval $(DEMO)/finetune/eval.json

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/shards.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/finetune.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
