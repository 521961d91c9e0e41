# Two entry points for a newcomer: `make run` (the main job on defaults) and `make test`.
# Both create .venv and install mpq into it first. CI pins torch; users get pyproject's range.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
SHARED_DATA := ../shared/data/cifar10-jpeg.tar.gz
CACHE := $(HOME)/.cache/mpq
# Data: $MPQ_DATA if set; else the JPEG copy beside this checkout, extracted once; else torchvision
# downloads CIFAR-10 (on a machine that is online).
MPQ_DATA ?= $(shell [ -f $(SHARED_DATA) ] && echo $(CACHE)/cifar10-jpeg)
export MPQ_DATA

.PHONY: setup test test-slow test-bf16 run data results

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test,openvino]'

data:
	@if [ -f $(SHARED_DATA) ] && [ ! -d $(CACHE)/cifar10-jpeg/test ]; then \
	  mkdir -p $(CACHE)/cifar10-jpeg && tar xzf $(SHARED_DATA) -C $(CACHE)/cifar10-jpeg; fi

# The default suite (under 10 minutes on 2 cores); test-slow adds the minutes-long real-data and
# ImageNet-size runs. CI runs both.
test: setup data
	$(BIN)/python -m pytest -q -n auto -m "not slow"

test-slow: setup data
	$(BIN)/python -m pytest -q -n auto -m slow

# The default suite as a CPU with native bf16 runs it if `auto` picks bf16 there: autocast forced
# to bf16 ($$MPQ_AUTO_PRECISION). Runs on any CPU; without native bf16 it is several times slower.
test-bf16: setup data
	MPQ_AUTO_PRECISION=bf16 $(BIN)/python -m pytest -q -n auto -m "not slow"

# The main job: the committed teacher if there is one (else train it, resumably), a search at
# 13x compression, QAT with distillation on the plan found.
TEACHER := $(if $(wildcard checkpoints/resnet20_cifar10.pt),checkpoints/resnet20_cifar10.pt,runs/resnet20_cifar10_fp32/model.pt)
BUDGET ?= 13x
# QAT epochs; empty: the QAT recipe's (10). Another count trains into its own folder.
EPOCHS ?=

run: setup data
	@[ -f $(TEACHER) ] || $(BIN)/python train.py --recipe recipes/resnet20_cifar10_fp32.yaml --out runs/resnet20_cifar10_fp32
	$(BIN)/python search.py --recipe recipes/resnet20_cifar10.yaml --checkpoint $(TEACHER) --budget $(BUDGET) --out runs/search_$(BUDGET)
	$(BIN)/python train.py --recipe recipes/resnet20_cifar10_qat.yaml --teacher $(TEACHER) --plan runs/search_$(BUDGET)/plan.json $(if $(EPOCHS),--set train.epochs=$(EPOCHS)) --out runs/qat_$(BUDGET)$(if $(EPOCHS),_$(EPOCHS)ep)

# The README's results table: every row (searches, QAT, PTQ, baselines), resumably.
results: setup data
	$(BIN)/python benchmarks/results.py --publish
