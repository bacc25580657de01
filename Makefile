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
HOST ?= 127.0.0.1
PORT ?= 8000
# Root installs Debian packages directly; anyone else goes through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup demo demo-data export-default train export-run index reindex eval compare compare-bundles improve \
	cluster duplicates serve chromium containers-deps lint test test-containers bench bench-writes loadtest faults docker docker-gpu docker-jobs deploy-check \
	deploy-render clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: DATA=$(DATA) MODEL=$(MODEL) BACKBONE=$(BACKBONE) RUN=$(RUN) INDEX=$(INDEX)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[train,ray,dev]"
	@touch $@

setup: $(BIN)/.installed ## create .venv and install the project with its train, ray and dev extras

demo: setup demo-data export-default index serve ## the main job: demo corpus, default model, bundle, then serve it

demo-data: setup ## build the demo corpus (class folders of scikit-image photos) in DATA
	$(PY) -m train.demo_data --out $(DATA)

PRECISION ?= fp32
export-default: setup ## export the embedded pretrained backbone to MODEL (ONNX + model.json; PRECISION=fp32|int8)
	$(PY) -m export --backbone $(BACKBONE) --out $(MODEL) --check-images $(IMAGES) --precision $(PRECISION)

train: setup ## fine-tune BACKBONE on IMAGES into RUN (EPOCHS, class subfolders)
	$(PY) -m train --data $(IMAGES) --backbone $(BACKBONE) --epochs $(EPOCHS) --out $(RUN)

export-run: setup ## export the fine-tuned RUN to $(RUN)/onnx
	$(PY) -m export --model $(RUN) --out $(RUN)/onnx --check-images $(IMAGES)

INDEX_TYPE ?= flat
index: setup ## embed IMAGES with MODEL into the bundle INDEX (incremental; INDEX_TYPE=flat|hnsw|ivf|auto)
	$(PY) -m indexer build --model $(MODEL) --images $(IMAGES) --index $(INDEX) --index-type $(INDEX_TYPE)

reindex: setup ## rebuild INDEX from scratch (re-embed every image with MODEL)
	$(PY) -m indexer build --model $(MODEL) --images $(IMAGES) --index $(INDEX) --index-type $(INDEX_TYPE) --rebuild

eval: setup ## retrieval metrics of INDEX on the class-folder QUERIES (JSON)
	$(PY) -m indexer eval --index $(INDEX) --queries $(QUERIES)

OTHER ?= bundles/demo-finetuned
compare-bundles: setup ## the same queries on INDEX and OTHER, and the difference (JSON)
	$(PY) -m indexer eval --index $(INDEX) --queries $(QUERIES) --compare $(OTHER)

DEVSETS ?= ../shared/devsets
COMPARE_ARGS ?=
compare: setup ## retrieval quality table on the dev sets (pretrained GAP/GeM, PCA, QE; COMPARE_ARGS="--default --losses cosface,arcface,multisimilarity,softmax --epochs 20" also fine-tunes) -> bench/results/devsets.md
	$(PY) -m bench.devsets --devsets $(DEVSETS) --out bench/results --work runs/devsets $(COMPARE_ARGS)

MIN_GAIN ?= 0
improve: setup ## fine-tune BACKBONE on IMAGES, stage and compare with INDEX on QUERIES, publish to INDEX only if mAP@10 gains > MIN_GAIN
	$(PY) -m train improve --images $(IMAGES) --index $(INDEX) --queries $(QUERIES) --backbone $(BACKBONE) --epochs $(EPOCHS) --min-gain $(MIN_GAIN)

K ?= 8
cluster: setup ## k-means INDEX into K clusters, with a contact sheet per cluster
	$(PY) -m indexer cluster --index $(INDEX) --k $(K)

THRESHOLD ?= 0.95
duplicates: setup ## groups of near-duplicates in INDEX above cosine THRESHOLD
	$(PY) -m indexer duplicates --index $(INDEX) --threshold $(THRESHOLD)

serve: setup ## serve the bundle INDEX on HOST:PORT (web page at /, API docs at /docs)
	$(PY) -m service --index $(INDEX) --host $(HOST) --port $(PORT)

chromium: ## install Debian's chromium for the browser test (apt-get, as root or with sudo)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# podman with runc (crun refuses on hosts with hybrid cgroups) and debootstrap (the test makes its base image).
containers-deps: ## install podman, runc and debootstrap for the container image test (apt-get, as root or with sudo)
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends podman runc debootstrap >/dev/null; }

lint: setup ## ruff check, ruff format --check and mypy (settings in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup chromium containers-deps lint ## install everything the tests need, lint, and run the test suite
	$(BIN)/pytest -q

test-containers: setup containers-deps ## build the CPU and jobs images with podman and run them (tests/test_container_images.py)
	$(BIN)/pytest -q tests/test_container_images.py

bench: setup ## benchmarks a-f against baselines -> bench/results/report.md and report.json (about an hour)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(PY) -m bench --out bench/results

bench-writes: setup demo-data export-default ## online adds/deletes by bundle size (1k-1M), writes vs searches, compaction -> bench/results/writes.md
	$(PY) -m bench writes --model $(MODEL) --images $(IMAGES) --out bench/results

LOADTEST_PAD ?= 100000
loadtest: setup demo-data export-default ## 60 s, 16 clients of searches/adds/deletes on a 100k-vector bundle, then restart checks
	$(PY) -m bench bundle --model $(MODEL) --images $(IMAGES) --pad $(LOADTEST_PAD) --index-type auto --out bundles/loadtest
	$(PY) -m loadtest --index bundles/loadtest --model $(MODEL) --images $(IMAGES) --duration 60 --clients 16 --out loadtest/results

faults: setup ## the fault and bad-input tests (SIGKILL, corrupt bundles, failed writes, hostile uploads)
	$(BIN)/pytest -q tests/test_reliability_faults.py tests/test_reliability_inputs.py tests/test_indexer_sigkill.py

docker: ## build the CPU service image (deploy/Dockerfile) as imgsearch:cpu
	docker build -f deploy/Dockerfile -t imgsearch:cpu .

docker-gpu: ## build the GPU service image (deploy/Dockerfile.gpu) as imgsearch:gpu
	docker build -f deploy/Dockerfile.gpu -t imgsearch:gpu .

docker-jobs: ## build the offline jobs image (train/export/index) as imgsearch-jobs:latest
	docker build -f deploy/Dockerfile.jobs -t imgsearch-jobs:latest .

deploy-check: setup ## check Dockerfiles, compose file and k8s manifests by parsing (no Docker needed)
	$(PY) -m deploy.validate

deploy-render: ## render the Kubernetes manifests (kubectl kustomize deploy/k8s)
	kubectl kustomize deploy/k8s

clean: ## remove generated data, models, runs and bundles (not the venv)
	rm -rf data models runs bundles
