# Two commands on a fresh machine:  `make demo` (the end-to-end DeViT demo)  and  `make test`.
# Both create .venv/ when missing, install requirements.txt and Debian's Fashion-MNIST when its files are absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-quick test test-slow test-all lint bench setup data clean

setup: $(STAMP) $(FMNIST)

$(STAMP): requirements.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup
	PYTHON=$(PY) bash demo.sh

demo-quick: setup
	PYTHON=$(PY) bash demo.sh --quick

test: setup
	$(PY) -m pytest -q tests -m "not slow"

# The slow cases (crash-and-resume of stages 2 and 3, the seed's commands with DeiT's defaults, ...): CI runs them.
test-slow: setup
	$(PY) -m pytest -q tests -m slow

test-all: setup
	$(PY) -m pytest -q tests

# Style (ruff) and the layers of docs/architecture.md (import-linter's contracts in .importlinter).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf output
