#!/usr/bin/env bash
# GPU smoke run (`make gpu-smoke`): build every TensorRT engine, check parity, time every backend, and
# write one JSON + markdown report (benchmarks/gpu_smoke.py), whatever this host has: rows that
# cannot run here are reported as skipped, with the reason; a failing row never stops the others.
#
#   bash benchmarks/gpu_smoke.sh                                  # the small test export
#   EXPORT_DIR=demo_out/export bash benchmarks/gpu_smoke.sh       # a real `diffgap export` directory
#
# Environment knobs:
#   PY          python to run (default: $VENV/bin/python if it exists, else python3); nothing is installed
#               unless INSTALL=1
#   INSTALL=1   create $VENV (default .venv-gpu, never the CPU .venv: the gpu extra brings onnxruntime-gpu,
#               which must not sit beside the CPU onnxruntime wheel) and `pip install -e .[gpu,dev] onnx`
#   EXPORT_DIR  export directory to build engines for (default: the small test export, built here)
#   OUT         report folder (default benchmarks/results/gpu-smoke-<host>-<utc time>)
#   OPT_LEVEL   TensorRT builder optimisation level (default 3)
#   REPEATS     timed calls per row (default 50, after 10 warm-up calls)
#   PRESET      model preset of the PyTorch baselines (default clap-512)
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-gpu}
if [ -z "${PY:-}" ]; then
    if [ -x "$VENV/bin/python" ] || [ "${INSTALL:-0}" = "1" ]; then PY="$VENV/bin/python"; else PY=python3; fi
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-benchmarks/results/gpu-smoke-$(hostname -s)-$STAMP}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "[gpu-smoke $(date -u +%H:%M:%S)] $*"; }

# -- pycuda first: it ships no wheels, so installing it compiles against the CUDA toolkit ----------
have_nvcc() { command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_ROOT:-${CUDA_HOME:-/usr/local/cuda}}/bin/nvcc" ]; }
if [ "${INSTALL:-0}" = "1" ]; then
    if ! have_nvcc && ! { [ -x "$PY" ] && "$PY" -c "import pycuda.driver" 2>/dev/null; }; then
        log "cannot install the gpu extra: pycuda has no wheels and builds from source with nvcc, which is not on PATH"
        log "and not under \$CUDA_ROOT/bin (${CUDA_ROOT:-${CUDA_HOME:-/usr/local/cuda}}). Install the CUDA toolkit (or set CUDA_ROOT),"
        log "or run without INSTALL=1: the rows that need TensorRT + pycuda are then reported as skipped."
        exit 2
    fi
    { test -x "$PY" || python3 -m venv "$VENV"; } && "$PY" -m pip install -q -e ".[gpu,dev]" "onnx>=1.17" \
        || { log "pip install -e .[gpu,dev] failed (see above)"; exit 2; }
    if "$PY" -m pip show onnxruntime >/dev/null 2>&1 && "$PY" -m pip show onnxruntime-gpu >/dev/null 2>&1; then
        log "both onnxruntime and onnxruntime-gpu are installed in $VENV: uninstall onnxruntime"; exit 2
    fi
elif ! "$PY" -c "import pycuda.driver" 2>/dev/null; then
    if have_nvcc; then
        log "pycuda is not installed: TensorRT rows will be skipped (\`pip install pycuda\` can build it here: nvcc found)"
    else
        log "pycuda is not installed and cannot be built here: it ships no wheels and compiles against the CUDA"
        log "toolkit (nvcc or CUDA_ROOT), which this host lacks. TensorRT rows will be skipped; the others still run."
    fi
fi

# -- pip's TensorRT keeps libnvinfer in the tensorrt_libs package, where onnxruntime's TensorRT provider
# does not look: put that folder on the library path before python starts ----------------------------
TRT_LIBS=$("$PY" -c "import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))" 2>/dev/null || true)
if [ -n "$TRT_LIBS" ]; then
    export LD_LIBRARY_PATH="$TRT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    log "LD_LIBRARY_PATH += $TRT_LIBS (pip's TensorRT libraries, for onnxruntime's TensorRT provider)"
fi

log "python: $PY; report folder: $OUT"
args=(--out "$OUT" --repeats "${REPEATS:-50}" --opt-level "${OPT_LEVEL:-3}" --preset "${PRESET:-clap-512}")
[ -n "${EXPORT_DIR:-}" ] && args+=(--export "$EXPORT_DIR")
"$PY" benchmarks/gpu_smoke.py "${args[@]}"
rc=$?
[ -f "$OUT/gpu_smoke.md" ] && cat "$OUT/gpu_smoke.md"
if [ $rc -ne 0 ]; then log "GPU smoke: some rows FAILED (exit $rc); report in $OUT"; exit $rc; fi
log "GPU smoke: no row failed; report in $OUT"
