"""The GPU smoke run's report (``gpu_smoke.json`` + ``gpu_smoke.md``), its timing and its parity check.

Used by ``benchmarks/gpu_smoke.py``; numpy and ``diffgap.core.fsutil`` only.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

FORMAT = "diffgap-gpu-smoke/1"
MIN_COS_FP16 = 0.999   # FP16 rows vs the FP32 reference, per output row (the GPU tests' bound)
MAX_ABS_FP32 = 5e-3    # FP32 rows: TensorRT may use TF32 tensor-core math on Ampere and later


class Report:
    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.out, self.rows, self.settings = out, [], settings
        self.machine: dict[str, Any] = {}

    def add(self, step: str, status: str, reason: str = "", **fields: Any) -> dict[str, Any]:
        row = {"step": step, "status": status, "reason": reason, **fields}
        self.rows.append(row)
        label = " ".join(str(fields[k]) for k in ("model", "backend", "precision", "batch") if k in fields)
        print(f"[gpu-smoke] {status:7s} {step} {label} {reason}".rstrip(), flush=True)
        self.write()
        return row

    def run(self, step: str, fn: Callable[[], dict[str, Any] | None], **fields: Any) -> dict[str, Any]:
        """One row from ``fn``: its dict is merged in; ``Skip`` -> skipped; any other error -> failed."""
        t0 = time.perf_counter()
        try:
            extra = fn() or {}
        except Skip as e:
            return self.add(step, "skipped", str(e), **fields)
        except Exception as e:  # recorded, and the run goes on
            return self.add(step, "failed", f"{type(e).__name__}: {e}"[:600], seconds=round(time.perf_counter() - t0, 3), **fields)
        status = extra.pop("status", "ok")
        reason = extra.pop("reason", "")
        return self.add(step, status, reason, seconds=round(time.perf_counter() - t0, 3), **fields, **extra)

    def summary(self) -> dict[str, int]:
        return {s: sum(r["status"] == s for r in self.rows) for s in ("ok", "failed", "skipped")}

    def write(self) -> None:
        from diffgap.core.fsutil import atomic_write_json, atomic_write_text

        doc = {"format": FORMAT, "machine": self.machine, "settings": self.settings, "summary": self.summary(), "rows": self.rows}
        atomic_write_json(self.out / "gpu_smoke.json", doc)
        atomic_write_text(self.out / "gpu_smoke.md", markdown(doc))


class Skip(Exception):
    """This row cannot run on this host; the message says why."""


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["summary"]
    lines = [f"# GPU smoke run, {m.get('date', '')}", "",
             f"Machine: {m.get('host', '')}; GPU: {m.get('gpu') or 'none'}; python {m.get('python', '')}.", "",
             "Libraries: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in m.get("libraries", {}).items()) + ".", "",
             f"Rows: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped "
             f"(timings: median of {doc['settings']['repeats']} calls after {doc['settings']['warmup']} warm-up calls).", "",
             "| step | model | backend | precision | B | status | median ms | p90 ms | items/s | parity | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        par = r.get("parity", "")
        if isinstance(par, dict):
            par = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in par.items())
        cells = [r["step"], r.get("model", ""), r.get("backend", ""), r.get("precision", ""), r.get("batch", ""), r["status"],
                 f"{r['median_ms']:.3f}" if "median_ms" in r else "", f"{r['p90_ms']:.3f}" if "p90_ms" in r else "",
                 f"{r['items_per_s']:.1f}" if "items_per_s" in r else "", par, str(r.get("reason", "")).replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def timed(call: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {"median_ms": statistics.median(ts), "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10]}


def compare(got: dict[str, Any], ref: dict[str, Any], precision: str) -> tuple[dict[str, float], str]:
    import numpy as np

    cos, err = 1.0, 0.0
    for k, a in got.items():
        a, b = a.astype(np.float64), ref[k].astype(np.float64)
        a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
        c = (a2 * b2).sum(1) / np.maximum(np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1), 1e-30)
        cos, err = min(cos, float(c.min())), max(err, float(np.abs(a - b).max()))
    bad = (precision == "fp16" and cos < MIN_COS_FP16) or (precision == "fp32" and err > MAX_ABS_FP32)
    return {"min_cosine": cos, "max_abs": err}, (f"parity outside the bound (fp16: cosine >= {MIN_COS_FP16}, "
                                                  f"fp32: |diff| <= {MAX_ABS_FP32})" if bad else "")
