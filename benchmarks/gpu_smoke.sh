#!/usr/bin/env bash
# GPU smoke run: install the gpu extra, build TensorRT engines, run the GPU tests, time every backend.
#
#   bash benchmarks/gpu_smoke.sh                 # tiny test export (no torch needed)
#   EXPORT_DIR=demo_out/export bash benchmarks/gpu_smoke.sh   # a real `diffgap export` directory
#
# Environment knobs:
#   VENV        virtualenv to create/reuse (default .venv-gpu; never the CPU .venv: the gpu extra brings
#               onnxruntime-gpu, which must not sit beside the CPU onnxruntime wheel)
#   EXPORT_DIR  export directory to build engines for (default: a small test export made here)
#   OUT         results folder (default benchmarks/results/gpu-smoke-<host>-<utc time>)
#   OPT_LEVEL   TensorRT builder optimisation level (default 3)
#   REPEATS     timed calls per row (default 50, after 10 warm-up calls)
#   SKIP_INSTALL=1  reuse $VENV as is
#
# Writes $OUT/{machine.txt, timings.csv, build.log, build-again.log, pytest-gpu.log, junit-gpu.xml,
# latency.json, latency.md}. Exits non-zero if any step fails (every step still gets its timing row).
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv-gpu}
PY="$VENV/bin/python"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-benchmarks/results/gpu-smoke-$(hostname -s)-$STAMP}
OPT_LEVEL=${OPT_LEVEL:-3}
REPEATS=${REPEATS:-50}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
echo "step,seconds,exit_code" > "$OUT/timings.csv"
FAILED=0

log() { echo "[gpu-smoke $(date -u +%H:%M:%S)] $*"; }

# timed NAME CMD...: run CMD, append "NAME,seconds,exit code" to timings.csv (also from inside a
# pipeline's subshell, which is why failures are read back from that file at the end)
timed() {
    local name=$1; shift
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$@"
    rc=$?
    t1=$(date +%s.%N)
    awk -v n="$name" -v a="$t0" -v b="$t1" -v rc="$rc" 'BEGIN { printf "%s,%.2f,%d\n", n, b - a, rc }' >> "$OUT/timings.csv"
    if [ "$rc" -ne 0 ]; then log "FAILED: $name (exit $rc)"; else log "ok: $name"; fi
    return $rc
}

# -- 0. the machine ------------------------------------------------------------------------------
{
    echo "date: $STAMP"; echo "host: $(hostname)"; uname -a
    lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)" || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi unavailable"
} | tee "$OUT/machine.txt"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    log "no nvidia-smi: this script needs an NVIDIA GPU host"; exit 2
fi

# -- 1. install ----------------------------------------------------------------------------------
install() {
    test -x "$PY" || python3 -m venv "$VENV" || return 1
    "$PY" -m pip install -q --upgrade pip || return 1
    # gpu: tensorrt + pycuda + onnxruntime-gpu; dev: pytest; onnx: the test export's graph builder
    "$PY" -m pip install -q -e ".[gpu,dev]" "onnx>=1.17" ftfy regex || return 1
    if "$PY" -m pip show onnxruntime >/dev/null 2>&1; then
        echo "both onnxruntime and onnxruntime-gpu are installed in $VENV; uninstall onnxruntime" >&2
        return 1
    fi
}
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    timed install install || exit 1
fi
timed versions "$PY" - <<'EOF' || exit 1
import onnxruntime as ort, tensorrt as trt
import pycuda.driver as cuda
from diffgap.runtime.engine import HostInfo, needs_strongly_typed_flag
h = HostInfo.current()
print(f"TensorRT {trt.__version__} (explicit STRONGLY_TYPED flag: {needs_strongly_typed_flag(trt.__version__)}), "
      f"onnxruntime {ort.__version__} {ort.get_available_providers()}, CUDA driver {cuda.get_driver_version()}")
print(f"GPU: {h.describe()}  -> engine folder {h.slug}")
EOF

# -- 2. an export --------------------------------------------------------------------------------
if [ -z "${EXPORT_DIR:-}" ]; then
    EXPORT_DIR="$OUT/export"
    timed make-test-export "$PY" -c "
import sys; sys.path.insert(0, 'tests')
import runtime_graphs as rg
m = rg.make_export('$EXPORT_DIR')
print('test export:', m.root, sorted(m.models))" || exit 1
fi

# -- 3. engines: first build, then a cache hit, then a refused out-of-date rebuild ---------------
timed build-engines "$PY" -m diffgap.cli build-engines "$EXPORT_DIR" --precision fp16 fp32 \
    --opt-level "$OPT_LEVEL" 2>&1 | tee "$OUT/build.log"
timed build-engines-cached "$PY" -m diffgap.cli build-engines "$EXPORT_DIR" --precision fp16 fp32 \
    --opt-level "$OPT_LEVEL" 2>&1 | tee "$OUT/build-again.log"
grep -q "^build\|^rebuild" "$OUT/build-again.log" && { log "second build-engines did not reuse the cache"; FAILED=1; }
if "$PY" -m diffgap.cli build-engines "$EXPORT_DIR" --opt-level $(( (OPT_LEVEL + 1) % 6 )) --no-rebuild \
        > "$OUT/no-rebuild.log" 2>&1; then
    log "--no-rebuild with changed settings should have refused"; FAILED=1
else
    log "ok: --no-rebuild refused: $(tail -n1 "$OUT/no-rebuild.log")"
fi

# -- 4. GPU tests --------------------------------------------------------------------------------
# DIFFGAP_GPU_EXPORT: tests/test_runtime_gpu.py builds its own engines for this export (in a temp dir)
timed pytest-gpu env DIFFGAP_GPU_EXPORT="$EXPORT_DIR" "$PY" -m pytest -m gpu -q -rs tests \
    --junitxml="$OUT/junit-gpu.xml" 2>&1 | tee "$OUT/pytest-gpu.log"
grep -qE "[1-9][0-9]* passed" "$OUT/pytest-gpu.log" || { log "no GPU test passed (all skipped?)"; FAILED=1; }

# -- 5. latency of every backend -----------------------------------------------------------------
timed latency "$PY" - "$EXPORT_DIR" "$OUT" "$REPEATS" <<'EOF'
import json, statistics, sys, time
import numpy as np
from diffgap.core.manifest import Manifest
from diffgap.runtime.session import open_model

export, out, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
man = Manifest.load(export)
configs = [("ort-cpu", "fp32", {}), ("ort-cuda", "fp32", {}), ("ort-trt", "fp16", {}),
           ("tensorrt", "fp16", {}), ("tensorrt", "fp16", {"cuda_graph": True}), ("tensorrt", "fp32", {})]
rows = []
for name in sorted(man.models):
    io = man.model(name).io
    for backend, prec, opts in configs:
        label = backend + ("+graph" if opts.get("cuda_graph") else "")
        try:
            sess = open_model(man, name, backend=backend, precision=prec, **opts)
        except Exception as e:  # recorded, not hidden: e.g. ORT without the TensorRT EP libraries
            rows.append({"model": name, "backend": label, "precision": prec, "error": str(e)[:200]})
            print(f"{name:26s} {label:14s} {prec}: unavailable ({str(e)[:120]})")
            continue
        with sess:
            for batch in sorted({1, io.opt_batch, io.max_batch}):
                feeds = io.sample_inputs(batch, seed=0)
                for _ in range(10):
                    sess.infer(feeds)
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter(); sess.infer(feeds); ts.append((time.perf_counter() - t0) * 1e3)
                ts.sort()
                row = {"model": name, "backend": label, "precision": prec, "batch": batch,
                       "median_ms": statistics.median(ts), "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10],
                       "items_per_s": batch / (statistics.median(ts) / 1e3)}
                rows.append(row)
                print(f"{name:26s} {label:14s} {prec} B={batch:<4d} median {row['median_ms']:8.3f} ms  "
                      f"p10 {row['p10_ms']:8.3f}  p90 {row['p90_ms']:8.3f}  {row['items_per_s']:10.1f} items/s")
json.dump({"export": export, "repeats": repeats, "warmup": 10, "rows": rows}, open(f"{out}/latency.json", "w"), indent=2)
with open(f"{out}/latency.md", "w") as f:
    f.write("| model | backend | precision | B | median ms | p10 | p90 | items/s |\n|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if "error" in r:
            f.write(f"| {r['model']} | {r['backend']} | {r['precision']} | - | unavailable | | | |\n")
        else:
            f.write(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | {r['median_ms']:.3f} | "
                    f"{r['p10_ms']:.3f} | {r['p90_ms']:.3f} | {r['items_per_s']:.1f} |\n")
EOF

# -- 6. summary ----------------------------------------------------------------------------------
log "timings (s):"; column -s, -t "$OUT/timings.csv" 2>/dev/null || cat "$OUT/timings.csv"
log "results in $OUT"
awk -F, 'NR > 1 && $3 != 0 { bad = 1 } END { exit bad }' "$OUT/timings.csv" || FAILED=1
if [ "$FAILED" -ne 0 ]; then
    log "GPU smoke FAILED"; exit 1
fi
log "GPU smoke passed"
