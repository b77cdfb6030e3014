# Every target does its own set-up on a fresh machine: a virtual environment with the
# project installed, and Debian's Fashion-MNIST package for the data-backed runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qdq-installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data test test-oldest-torch lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q "torch>=2.4" torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data:
	@if [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ] && [ -z "$$QDQ_FASHION_MNIST" ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# --dist loadgroup: the tests that start gloo process groups (marked xdist_group "gloo")
# run one after another on one worker, never two groups at once.
test: setup data
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 --dist loadgroup -q

# The suite on the oldest torch the project supports, in its own environment, with the
# versions constraints/torch2.4.txt pins (torch, torchvision, and the newest transformers
# that runs on that torch). The environment is made afresh whenever the pins or
# pyproject.toml change, so nothing left from another resolution takes part.
OLDEST_VENV := .venv-torch2.4
OLDEST_PINS := constraints/torch2.4.txt
OLDEST_STAMP := $(OLDEST_VENV)/.qdq-installed

test-oldest-torch: $(OLDEST_STAMP) data
	$(OLDEST_VENV)/bin/python -m pytest -n 2 --dist loadgroup -q

$(OLDEST_STAMP): pyproject.toml $(OLDEST_PINS)
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -c $(OLDEST_PINS) -e '.[dev]'
	$(OLDEST_VENV)/bin/python -m pip check
	touch $@

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

demo: setup data
	$(VENV)/bin/qdq run --out runs/demo

bench: setup
	$(PY) scripts/bench_calib.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs .pytest_cache
