# mergelab: `make demo` runs the main job on the embedded default store, `make test` runs the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup test demo bench ui lint clean stack-check stack-up

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	-$(BIN)/pip uninstall -y -q torchvision
	@# MLflow's schema for fresh stores, built once (platform/store_template.py): the first tracked merge copies it
	-$(BIN)/python -c "from mergelab.platform import store_template as t; d = t.template_dir(); d and t.ready_template(d)"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(BIN)/mergelab demo

bench: setup
	$(BIN)/python benchmarks/merge_vs_mergekit.py
	$(BIN)/python benchmarks/optmerge_cost.py

ui: setup
	$(BIN)/mergelab ui

# The compose stack (docs/scale-out.md): refuse a missing .env or placeholder/short secrets before starting it.
stack-check:
	docker/check-env.sh .env

stack-up: stack-check
	docker compose up -d postgres mlflow

lint: setup
	$(BIN)/ruff check mergelab tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
