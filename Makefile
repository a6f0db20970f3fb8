# `make demo`: set up everything, then compare plain and speculative decoding on the embedded model.
# `make test`: set up everything, then lint (ruff) and run the whole test suite (fast and slow groups).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/quickdraft demo

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check src tests
