#!/usr/bin/env bash
# GPU smoke run (`make gpu-smoke`): build every TensorRT engine, check parity, time every backend, and
# write one JSON + markdown report (benchmarks/gpu_smoke.py), whatever this host has: rows that
# cannot run here are reported as skipped, with the reason; a failing row never stops the others.
#
#   bash benchmarks/gpu_smoke.sh                                  # the small test export
#   EXPORT_DIR=demo_out/export bash benchmarks/gpu_smoke.sh       # a real `diffgap export` directory
#
# Environment knobs:
#   PY          python to run (default: $VENV/bin/python if it exists, else .venv/bin/python, else python3); nothing is installed
#               unless INSTALL=1
#   INSTALL=1   create $VENV (default .venv-gpu, never the CPU .venv: the gpu extra brings onnxruntime-gpu,
#               which must not sit beside the CPU onnxruntime wheel) and `pip install -e .[$GPU_EXTRA,dev] onnx`
#   GPU_EXTRA   gpu (TensorRT 11, CUDA 13, driver >= 580.65.06; default) or gpu-trt10 (TensorRT 10, CUDA 12)
#   PYTEST_TIMEOUT  seconds `pytest -m gpu` may run (default 3600)
#   EXPORT_DIR  export directory to build engines for (default: the small test export, built here)
#   OUT         report folder (default benchmarks/results/gpu-smoke-<host>-<utc time>)
#   OPT_LEVEL   TensorRT builder optimisation level (default 3)
#   REPEATS     timed calls per row (default 50, after 10 warm-up calls)
#   PRESET      model preset of the PyTorch baselines (default clap-512)
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-gpu}
if [ -z "${PY:-}" ]; then
    if [ -x "$VENV/bin/python" ] || [ "${INSTALL:-0}" = "1" ]; then PY="$VENV/bin/python"
    elif [ -x .venv/bin/python ]; then PY=.venv/bin/python   # the CPU venv of `make setup`: GPU rows skip
    else PY=python3; fi
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-benchmarks/results/gpu-smoke-$(hostname -s)-$STAMP}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[gpu-smoke $(date -u +%H:%M:%S)] $*"; }

# -- pycuda first: it ships no wheels, so installing it compiles against the CUDA toolkit: nvcc, a C++
# compiler and the Python headers, each checked here with its fix ------------------------------------
have_nvcc() { command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_ROOT:-${CUDA_HOME:-/usr/local/cuda}}/bin/nvcc" ]; }
pycuda_build_missing() {
    local py=${1:-python3} missing=()
    have_nvcc || missing+=("nvcc (install the CUDA toolkit of the extra's CUDA major, or set CUDA_ROOT)")
    command -v g++ >/dev/null 2>&1 || missing+=("g++ (apt-get install g++)")
    "$py" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
        || missing+=("the Python headers, Python.h (apt-get install python3-dev, or a python built with them)")
    local IFS=';'; echo "${missing[*]}"
}
if [ "${INSTALL:-0}" = "1" ]; then
    if ! { [ -x "$PY" ] && "$PY" -c "import pycuda.driver" 2>/dev/null; }; then
        missing=$(pycuda_build_missing "$( [ -x "$PY" ] && echo "$PY" || echo python3 )")
        if [ -n "$missing" ]; then
            log "cannot install the ${GPU_EXTRA:-gpu} extra: pycuda has no wheels and compiles at install time; missing: $missing."
            log "Fix those, or run without INSTALL=1: the rows that need TensorRT + pycuda are then reported as skipped."
            exit 2
        fi
    fi
    # the GPU tests need onnx (the small test export) besides the extra; test_export_gpu.py needs the export
    # extra (torch, modelopt), whose onnxruntime-gpu pin is not this extra's: it is skipped and counted
    { test -x "$PY" || python3 -m venv "$VENV"; } && "$PY" -m pip install -q -e ".[${GPU_EXTRA:-gpu},dev]" "onnx>=1.17" \
        || { log "pip install -e .[${GPU_EXTRA:-gpu},dev] failed (see above)"; exit 2; }
    if "$PY" -m pip show onnxruntime >/dev/null 2>&1 && "$PY" -m pip show onnxruntime-gpu >/dev/null 2>&1; then
        log "both onnxruntime and onnxruntime-gpu are installed in $VENV: uninstall onnxruntime"; exit 2
    fi
elif ! "$PY" -c "import pycuda.driver" 2>/dev/null; then
    missing=$(pycuda_build_missing "$PY")
    if [ -z "$missing" ]; then
        log "pycuda is not installed: TensorRT rows will be skipped (\`pip install pycuda\` can build it here)"
    else
        log "pycuda is not installed and cannot be built here (it ships no wheels); missing: $missing."
        log "TensorRT rows will be skipped; the others still run."
    fi
fi

# No LD_LIBRARY_PATH for pip's TensorRT or CUDA libraries: diffgap.runtime.gpu_libs loads them itself,
# and this run checks that it does.
log "python: $PY; report folder: $OUT"
args=(--out "$OUT" --repeats "${REPEATS:-50}" --opt-level "${OPT_LEVEL:-3}" --preset "${PRESET:-clap-512}" --pytest-timeout "${PYTEST_TIMEOUT:-3600}")
[ -n "${EXPORT_DIR:-}" ] && args+=(--export "$EXPORT_DIR")
"$PY" benchmarks/gpu_smoke.py "${args[@]}"
rc=$?
[ -f "$OUT/gpu_smoke.md" ] && cat "$OUT/gpu_smoke.md"
if [ $rc -ne 0 ]; then log "GPU smoke: some rows FAILED (exit $rc); report in $OUT"; exit $rc; fi
log "GPU smoke: no row failed; report in $OUT"
