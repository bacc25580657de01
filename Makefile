# Similar-image search: train -> export -> index -> serve. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export TF_CPP_MIN_LOG_LEVEL ?= 3

DATA ?= data/demo
IMAGES ?= $(DATA)/images
QUERIES ?= $(DATA)/queries
BACKBONE ?= efficientnet_lite0
MODEL ?= models/default
RUN ?= runs/demo
EPOCHS ?= 3
INDEX ?= bundles/demo

.DEFAULT_GOAL := help
.PHONY: help setup demo demo-data export-default train export-run test clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: DATA=$(DATA) MODEL=$(MODEL) BACKBONE=$(BACKBONE) RUN=$(RUN) INDEX=$(INDEX)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,dev]"
	@touch $@

setup: $(BIN)/.installed ## create .venv and install the project with its train and dev extras

demo: setup demo-data export-default ## the main job on the embedded default: demo corpus + default model
	@echo "demo corpus in $(DATA), model in $(MODEL)"

demo-data: setup ## build the demo corpus (class folders of scikit-image photos) in DATA
	$(PY) -m train.demo_data --out $(DATA)

export-default: setup ## export the embedded pretrained backbone to MODEL (ONNX + model.json)
	$(PY) -m export --backbone $(BACKBONE) --out $(MODEL) --check-images $(IMAGES)

train: setup ## fine-tune BACKBONE on IMAGES into RUN (EPOCHS, class subfolders)
	$(PY) -m train --data $(IMAGES) --backbone $(BACKBONE) --epochs $(EPOCHS) --out $(RUN)

export-run: setup ## export the fine-tuned RUN to $(RUN)/onnx
	$(PY) -m export --model $(RUN) --out $(RUN)/onnx --check-images $(IMAGES)

test: setup ## install and run the test suite
	$(BIN)/pytest -q

clean: ## remove generated data, models, runs and bundles (not the venv)
	rm -rf data models runs bundles
