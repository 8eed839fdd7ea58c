"""The GPU smoke run's CPU-side checks: its pytest selection collects and runs in an environment
without torch, and its driver reports every row it cannot run here as skipped, with the reason.

"Without torch" is made real, not assumed: a ``sitecustomize`` on the child's ``PYTHONPATH`` wraps
every finder on ``sys.meta_path`` so that none finds ``torch``/``torchvision``/``laion_clap``: imports
fail and ``importlib.util.find_spec`` returns None, exactly as in an interpreter without them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = '''
import sys

BLOCKED = {"torch", "torchvision", "laion_clap"}


class _Hide:
    """Wraps one finder; for a blocked package it finds nothing, as when it is not installed."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


def _smoke_module():
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch_free_env(tmp_path: Path) -> dict[str, str]:
    shim = tmp_path / "no_torch"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; assert u.find_spec('laion_clap') is None; import torch"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, "the blocker must hide torch"
    return env


def test_gpu_selection_collects_and_runs_without_torch(tmp_path):
    env = _torch_free_env(tmp_path)
    junit = tmp_path / "junit.xml"
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests", f"--junitxml={junit}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "error" not in out.splitlines()[-1], out[-2000:]
    # modules that import torch at top level are skipped with the reason, not collection errors
    assert "test_model.py needs torch (`pip install -e .[train]`), not installed here" in out
    # the torch-free GPU tests were collected: each is skipped by tests/conftest.py with the GPU reason
    gpu_skips = [line for line in out.splitlines() if line.startswith("SKIPPED") and "test_runtime_gpu.py" in line]
    assert gpu_skips, out[-3000:]
    assert all("TensorRT" in line or "CUDA" in line or "pycuda" in line for line in gpu_skips), gpu_skips
    # the smoke run's per-file counts, read from the same junit report pytest wrote
    counts = _smoke_module().junit_counts(junit)
    n_gpu = sum(int(line.split("[")[1].split("]")[0]) for line in gpu_skips)
    assert counts["test_runtime_gpu.py"] == {"passed": 0, "failed": 0, "skipped": n_gpu}


def test_smoke_driver_without_a_gpu_reports_skips(tmp_path):
    env = _torch_free_env(tmp_path)
    out = tmp_path / "report"
    p = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--out", str(out), "--repeats", "2", "--warmup", "1", "--skip-pytest"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    doc = json.loads((out / "gpu_smoke.json").read_text())
    assert doc["format"] == "diffgap-gpu-smoke/1" and doc["machine"]["libraries"]["torch"] is None
    rows = doc["rows"]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    # decided by the driver itself (libcuda's cuInit / cuDeviceGetCount), not by cuda-python
    gpu = by_step["gpu"][0]
    assert gpu["status"] == "skipped" and gpu["reason"].startswith("no GPU: ") and ("libcuda" in gpu["reason"] or "cuInit" in gpu["reason"])
    assert by_step["build-engines"][0]["status"] == "skipped"
    assert by_step["torch"] == [{"step": "torch", "status": "skipped", "reason": "PyTorch is not installed"}]
    lat = by_step["latency"]
    ort_cpu = [r for r in lat if r["backend"] == "ort-cpu"]
    assert ort_cpu and all(r["status"] == "ok" and r["median_ms"] > 0 for r in ort_cpu), "onnxruntime CPU is measured"
    gpu_rows = [r for r in lat if r["backend"] != "ort-cpu"]
    assert gpu_rows and all(r["status"] == "skipped" and r["reason"] for r in gpu_rows)
    assert not [r for r in rows if r["status"] == "failed"]
    md = (out / "gpu_smoke.md").read_text()
    assert md.count("| skipped |") == sum(r["status"] == "skipped" for r in rows)


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke_report", ROOT / "benchmarks" / "gpu_smoke_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rep = mod.Report(tmp_path, {"repeats": 1, "warmup": 0})

    def boom():
        raise RuntimeError("execute_async_v3 failed")

    def not_here():
        raise mod.Skip("no GPU: test")

    rep.run("latency", boom, model="m", backend="tensorrt+graph", precision="fp16", batch=4)
    rep.run("latency", not_here, model="m", backend="ort-trt", precision="fp16")
    rep.run("latency", lambda: {"median_ms": 1.5, "p90_ms": 2.0, "items_per_s": 4.0}, model="m", backend="tensorrt", batch=4)
    doc = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["failed", "skipped", "ok"]
    assert doc["rows"][0]["reason"] == "RuntimeError: execute_async_v3 failed"
    assert doc["summary"] == {"ok": 1, "failed": 1, "skipped": 1}
    md = (tmp_path / "gpu_smoke.md").read_text()
    assert "| latency | m | tensorrt+graph | fp16 | 4 | failed |" in md and "| 1.500 | 2.000 | 4.0 |" in md
    # parity: FP16 rows by row cosine, FP32 rows by max abs difference
    import numpy as np

    ref = {"y": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)}
    par, bad = mod.compare({"y": ref["y"] + 1e-4}, ref, "fp32")
    assert not bad and abs(par["max_abs"] - 1e-4) < 1e-6
    par, bad = mod.compare({"y": np.array([[1.0, 0.1], [0.0, 1.0]], np.float32)}, ref, "fp16")
    assert bad and par["min_cosine"] < 0.999
