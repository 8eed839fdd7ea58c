# Two commands on a fresh machine: `make demo` and `make test`. Both create/reuse .venv and install
# what they need first. CI (.ci/run) calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,export,serving,search,realdata,dev,generate
STAMP := $(VENV)/.diffgap-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup proxy speech demo test lint bench gpu-smoke gpu-resolve clean

setup: $(STAMP) proxy speech

# nginx: the body-limiting proxy `diffgap serve` puts in front of tritonserver (a no-op when installed).
proxy:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "installing nginx (the request-size-limiting proxy in front of tritonserver)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends nginx; }

# espeak-ng + sox: the speech synthesiser and audio tool of the real-embedding benchmark (benchmarks/realdata.py).
speech:
	@{ command -v espeak-ng && command -v sox; } >/dev/null 2>&1 || { \
	  echo "installing espeak-ng and sox (speech for the real-embedding benchmark)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends espeak-ng sox; }

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m benchmarks.perf_analyzer ensure-perf-analyzer || true
	@touch $@

demo: setup
	$(PY) -m diffgap.demo --out demo_out

test: setup
	$(PY) -m pytest -q

# The layer contracts (pyproject's [tool.importlinter]) on the package as a wheel installs it.
lint: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) tests/lint_imports.py

bench: setup
	$(PY) -m benchmarks --out benchmarks/results

# GPU smoke run: every row it cannot run on this host is reported as skipped, with the reason.
gpu-smoke:
	bash benchmarks/gpu_smoke.sh

# Do the `gpu` and `gpu-trt10` extras resolve, each to one CUDA major? pip's dry-run resolution from PyPI
# (no GPU needed; what it does and does not prove: benchmarks/gpu_smoke_resolve.py).
GPU_RESOLVE_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-resolve:
	$(GPU_RESOLVE_PY) benchmarks/gpu_smoke_resolve.py

clean:
	rm -rf demo_out build *.egg-info
