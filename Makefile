# One entry point for set-up, the demo and the tests. Every target that runs Python first
# makes sure the virtual environment exists (tools/setup_env.sh is idempotent and returns at
# once when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
OUTPUT ?= output/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint env

setup:
	@VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py --output-dir $(OUTPUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m flake8 projects tools tests train_net.py
	$(PY) -m isort --check-only --diff projects tools tests train_net.py
	$(PY) -m black --check -l 100 projects tools tests train_net.py

env: setup
	$(PY) -m acamkd.env
