# Two commands on a fresh machine: `make demo` and `make test`. Both create/reuse .venv and install
# what they need first. CI (.ci/run) calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,export,serving,search,dev,generate
STAMP := $(VENV)/.diffgap-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup proxy demo test test-fast bench gpu-smoke clean

setup: $(STAMP) proxy

# nginx: the body-limiting proxy `diffgap serve` puts in front of tritonserver (a no-op when installed).
proxy:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "installing nginx (the request-size-limiting proxy in front of tritonserver)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends nginx; }

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
