# Two commands on a fresh machine: `make demo` and `make test`. Both create/reuse .venv and install
# what they need first. CI (.ci/run) calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,export,serving,search,dev
STAMP := $(VENV)/.diffgap-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast bench gpu-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m diffgap.triton_models.tools ensure-perf-analyzer || true
	@touch $@

demo: setup
	$(PY) -m diffgap.demo --out demo_out

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks --out benchmarks/results

gpu-smoke:
	bash benchmarks/gpu_smoke.sh

clean:
	rm -rf demo_out build *.egg-info
