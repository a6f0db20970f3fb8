# `make demo`: set up everything, then compare plain and speculative decoding on the embedded model.
# `make test`: set up everything, then lint (ruff) and run the whole test suite (fast and slow groups).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-vllm demo test test-fast test-vllm lint
setup:
	@bash scripts/setup.sh

# vLLM's CPU build with quickdraft in it, in .venv-vllm (its pins differ from .venv's): for the vLLM tests,
# the bench's vllm methods and `vllm serve` with a quickdraft proposer.
setup-vllm: setup
	@bash scripts/setup_vllm.sh

demo: setup
	$(VENV)/bin/quickdraft demo

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

test-vllm: setup-vllm
	$(PY) -m pytest -q -m vllm

lint: setup
	$(PY) -m ruff check src tests
