# gannet: `make train` and `make test` each set everything up first (a venv in .venv).
# torch is installed before anything else so that accelerate/deepspeed never pull a CUDA build
# on a CPU machine; on a GPU cluster the same pin resolves to the CUDA wheel.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gannet-installed
MNIST := data/mnist/train-000000.tar
MNIST32 := data/mnist32/train-000000.tar
SILHOUETTES := data/silhouettes/a-000000.tar
CONFIG ?= sngan_mnist
# The shards a config trains on: MNIST unless the config is listed here.
DATA_cyclegan_silhouettes := $(SILHOUETTES)
DATA_r3gan_mnist := $(MNIST32)
DATA_r3gan_cmnist := $(MNIST32)
DATA = $(or $(DATA_$(CONFIG)),$(MNIST))

.PHONY: install train test shards clean clean-runs clean-data bench-gpu

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(MNIST): | $(STAMP)
	$(BIN)/gannet shards mnist --out data/mnist

$(MNIST32): | $(STAMP)
	$(BIN)/gannet shards mnist --size 32 --out data/mnist32

$(SILHOUETTES): | $(STAMP)
	$(BIN)/gannet shards silhouettes --out data/silhouettes

shards: $(MNIST)

# Trains the default (configs/sngan_mnist.yaml: SNGAN networks, spectral-norm D, hinge, G EMA, 2,000 steps)
# on the bundled real MNIST digits; runs/sngan_mnist/samples/*.png. CONFIG=lsgan_mnist: the plain LSGAN.
# Running it again continues the same run (resume=auto) instead of starting over.
# `make train CONFIG=cyclegan_silhouettes` writes the horse/zebra silhouette shards first, CONFIG=r3gan_mnist
# (and r3gan_cmnist) the digits padded to 32 px.
train: $(STAMP) $(DATA)
	$(BIN)/gannet train $(CONFIG) resume=auto $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# On one GPU, in under 10 minutes: the gpu-marked tests, then gannet's default step against the plain
# eager fp32 references (CycleGAN 256 px, DCGAN/LSGAN batch 64) and the loader: runs/bench-gpu.json.
bench-gpu: $(STAMP)
	CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} timeout 240 $(BIN)/python -m pytest -q -rs -m gpu tests/test_speed.py
	CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} timeout 330 $(BIN)/gannet bench speed --steps 20 --loader-s 10 --out runs/bench-gpu.json

# Build artefacts and caches only; runs and data are results, removed only when asked (below).
CLEANED := build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
clean:
	@found="$(wildcard $(CLEANED))"; caches=$$(find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print); \
	rm -rf $$found $$caches; \
	if [ -z "$$found$$caches" ]; then echo "make clean: no build artefacts or caches here"; \
	else echo "make clean: removed $$found$${caches:+$${found:+ and} $$(echo "$$caches" | wc -l) __pycache__ folder(s)}"; fi; \
	echo "make clean: kept runs/ (make clean-runs), data/ (make clean-data) and $(VENV)/"

# Every run under runs/ (checkpoints, samples, logs, W&B files): gone for good.
clean-runs:
	@if [ -d runs ]; then echo "make clean-runs: removing runs/: $$(ls runs | tr '\n' ' ')"; rm -rf runs; \
	else echo "make clean-runs: no runs/ here"; fi

# The shards under data/ (`make train` writes them again) and the evaluation features cached beside them.
clean-data:
	@if [ -d data ]; then echo "make clean-data: removing data/: $$(ls data | tr '\n' ' ')"; rm -rf data; \
	else echo "make clean-data: no data/ here"; fi

# docs/config.md from the config dataclasses' field comments (tests/test_config_reference.py fails when it is stale).
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m gannet.trainer.config.reference > docs/config.md

# The README's sample grids (docs/img/*.png): trains every bundled model in full first (~1.5 h on 2 CPU cores).
.PHONY: figures
figures: $(STAMP)
	$(BIN)/python docs/img/make_figures.py
