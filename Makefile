# Quick start: `make run` (install + default experiment on embedded synthetic data),
# `make test` (install + test suite). Both create .venv from scratch when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast benchmark bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch + torchvision from PyPI the ordinary way (they run on the CPU too)
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py -m experiment=quickstart data.category=texture,object
	$(BIN)/python -m ad_lightning.report "$$(ls -td outputs/multirun/*/ | head -1)" --metric image_auroc --rows data.category --cols model

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=10

# the suite without the tests marked slow (those that train for more than a few seconds)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

# the methods x categories benchmark on ../shared/datasets (about an hour on 2 CPU cores)
benchmark: $(STAMP)
	bash experiments/benchmark/run_shared.sh

# per method on this device: train img/s, ms/image at batch 1 and 32 (PyTorch, ONNX), x backbone, x peer PatchCore, peak memory; printed and in outputs/bench/bench.csv
bench: $(STAMP)
	$(BIN)/python -m ad_lightning.bench
	$(BIN)/python -m ad_lightning.bench models=[ganomaly,skip_ganomaly] image_size=64 out=outputs/bench/gan64
	$(BIN)/python -m ad_lightning.bench models=[anogan] image_size=64 overrides=[model.latent_steps=50] out=outputs/bench/anogan64

lint: $(STAMP)
	$(BIN)/ruff check ad_lightning tests run.py
	$(BIN)/ruff format --check ad_lightning tests run.py

clean:
	rm -rf outputs multirun .pytest_cache
