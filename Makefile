# `make run`: set up (once), then train and evaluate DAB-DETR on the built-in dataset.
# `make test`: set up (once), then lint and run the whole test suite.
# The environment is a virtualenv in .venv, created when missing and reused when present.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision for a fresh environment; one that already imports torch keeps its own.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: run test lint setup clean

setup: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

RUN_DIR ?= output/dn_dab_detr_R_18_shapes
# config overrides for `make run`, e.g. ARGS="SEED 2" (Detectron2's KEY VALUE pairs)
ARGS ?=

run: $(STAMP)
	$(PY) train_net.py --config-file configs/quick_schedules/dn_dab_detr_R_18_shapes.yaml \
		OUTPUT_DIR $(RUN_DIR) $(ARGS)
	$(PY) tools/plot_metrics.py $(RUN_DIR)/metrics.json --output $(RUN_DIR)/curve.png

lint: $(STAMP)
	$(PY) -m ruff check dab_detr tests tools demo benchmarks train_net.py

test: lint
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) output
