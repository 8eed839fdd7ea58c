"""Timing, the machine record and the result rows shared by every benchmark group.

Every latency is measured the same way: ``warmup`` untimed calls (fewer once they have taken
``max_warmup_s``; at least one), then timed calls until both
``repeats`` calls and ``min_time_s`` seconds have passed (or ``max_time_s``, whichever first, never
fewer than 3 calls). Reported: median, p10/p90, min, mean and the call count; ratios use medians.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 3
    repeats: int = 20
    min_time_s: float = 1.0
    max_time_s: float = 20.0
    max_warmup_s: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stats:
    """Per-call wall time in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    n: int

    @classmethod
    def from_samples(cls, samples_s: list[float]) -> "Stats":
        a = np.asarray(samples_s, dtype=np.float64) * 1e3
        return cls(
            median_ms=float(np.median(a)), p10_ms=float(np.percentile(a, 10)), p90_ms=float(np.percentile(a, 90)),
            min_ms=float(a.min()), mean_ms=float(a.mean()), n=int(a.size),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(fn: Callable[[], Any], policy: TimingPolicy) -> Stats:
    """Time ``fn()`` under ``policy``; see the module docstring."""
    t_warm = time.perf_counter()
    for _ in range(policy.warmup):
        fn()
        if time.perf_counter() - t_warm > policy.max_warmup_s:  # slow rows: one warm-up call is enough
            break
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        samples.append(t1 - t0)
        elapsed = t1 - start
        if len(samples) >= 3 and elapsed >= policy.max_time_s:
            break
        if len(samples) >= policy.repeats and elapsed >= policy.min_time_s:
            break
    return Stats.from_samples(samples)


@dataclass
class Row:
    """One measured (or skipped / failed) configuration."""

    group: str                      # "denoiser" | "encoders" | "pipeline" | "knobs"
    name: str                       # model or pipeline name, e.g. "diffgap_text_to_audio"
    backend: str                    # e.g. "torch-eager", "ort-cpu", "tensorrt"
    precision: str                  # "fp32" | "fp16" | "fp16-graph/ort-cpu-upcast" ...
    batch: int
    steps: int | None = None        # K for the denoiser rows
    status: str = "ok"              # "ok" | "skipped" | "failed"
    reason: str = ""                # why skipped / failed
    stats: Stats | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # roofline figures, compile time, settings ...

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.stats is not None

    @property
    def median_ms(self) -> float | None:
        return self.stats.median_ms if self.stats else None

    @property
    def items_per_s(self) -> float | None:
        return self.batch / (self.stats.median_ms / 1e3) if self.stats else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"] = self.stats.to_dict() if self.stats else None
        d["items_per_s"] = self.items_per_s
        return d


def run_row(row: Row, fn_factory: Callable[[], Callable[[], Any]], policy: TimingPolicy) -> Row:
    """Build the callable (setup errors count as failures), time it, fill ``row``; never raises."""
    try:
        fn = fn_factory()
        row.stats = measure(fn, policy)
        row.status = "ok"
    except Exception as e:  # a backend that fails is a recorded result, not a crashed benchmark
        row.status, row.reason = "failed", f"{type(e).__name__}: {e}".splitlines()[0][:300]
        log.warning("%s %s %s B=%s K=%s failed: %s", row.group, row.name, row.backend, row.batch, row.steps, row.reason)
    else:
        log.info(
            "%-9s %-24s %-22s %-10s B=%-3d K=%-4s %9.3f ms (p10 %.3f, p90 %.3f, n=%d)",
            row.group, row.name, row.backend, row.precision, row.batch, row.steps if row.steps is not None else "-",
            row.stats.median_ms, row.stats.p10_ms, row.stats.p90_ms, row.stats.n,
        )
    return row


# ---- the machine -------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    # the ones that decide which sgemm / fp16 kernels can run
                    return [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if x in have]
    except OSError:
        pass
    return []


def _cache_sizes() -> dict[str, str]:
    out: dict[str, str] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            p = os.path.join(base, idx)
            try:
                level = open(os.path.join(p, "level")).read().strip()
                kind = open(os.path.join(p, "type")).read().strip()
                size = open(os.path.join(p, "size")).read().strip()
            except OSError:
                continue
            if kind != "Instruction":
                out[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    except OSError:
        pass
    # The shared L3 of a VM often lists per-instance; lscpu sums it, which is what a roofline wants.
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in txt.splitlines():
            if line.strip().startswith(("L2 cache", "L3 cache")):
                k, v = line.split(":", 1)
                out[k.strip().split()[0] + " (total)"] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def gpu_info() -> dict[str, Any] | None:
    """The first NVIDIA GPU, or None. Uses nvidia-smi (no CUDA import needed)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        txt = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not txt:
        return None
    parts = [p.strip() for p in txt.splitlines()[0].split(",")]
    keys = ("name", "driver", "memory", "compute_capability")
    return {"count": len(txt.splitlines()), **dict(zip(keys, parts))}


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT + pycuda + a CUDA device are usable here, else why not (one line)."""
    if gpu_info() is None:
        return "no GPU (nvidia-smi finds no NVIDIA device)"
    from diffgap.runtime.trt_session import unavailable_reason

    return unavailable_reason()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine_record(threads: int) -> dict[str, Any]:
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        physical, mem_gb = None, None
    rec: dict[str, Any] = {
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "physical_cores": physical,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_used": threads,
        "caches": _cache_sizes(),
        "memory_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": gpu_info(),
        "versions": {
            k: _version(k)
            for k in ("diffgap", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                      "nvidia-pytriton", "tritonclient", "nvidia-modelopt")
            if _version(k)
        },
    }
    try:
        import onnxruntime as ort

        rec["ort_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            rec["virtualised"] = any("hypervisor" in line for line in f if line.startswith("flags"))
    except OSError:
        pass
    return rec


def machine_summary(m: dict[str, Any]) -> str:
    gpu = m.get("gpu")
    gpu_s = f"{gpu['name']} (driver {gpu['driver']})" if gpu else "no GPU"
    return (
        f"{m['host']}: {m['cpu_model']}, {m.get('physical_cores')} cores / {m.get('logical_cpus')} threads "
        f"({m.get('threads_used')} used), {m.get('memory_gb')} GiB, {gpu_s}; "
        f"torch {m['versions'].get('torch', '-')}, onnxruntime "
        f"{m['versions'].get('onnxruntime') or m['versions'].get('onnxruntime-gpu', '-')}"
    )


# ---- paths in results ---------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
# An absolute path: a "/" that starts a token (not inside a URL, a unit like "ms/req", or a ratio).
_ABSOLUTE = re.compile(r"(?<![\w.:/~$-])/(?=[\w.~-])[^\s\"'`,;()\[\]<>|]*")


def path_roots(work: Path | None = None, out: Path | None = None) -> list[tuple[str, str]]:
    """(absolute directory, what a results file records instead), in the order they are tried.

    Results are shared and committed, so they never name the machine's directories: the scratch
    directory becomes ``$WORK``, the Python environment ``$VENV``, anything else inside the repository
    is made relative to it, the results directory (when outside the repository) ``$OUT``, the
    temporary directory ``$TMPDIR`` and the home directory ``~``.
    """
    roots = [(work, "$WORK"), (Path(sys.prefix), "$VENV"), (REPO, ""), (out, "$OUT"),
             (Path(tempfile.gettempdir()), "$TMPDIR"), (Path.home(), "~")]
    seen, pairs = set(), []
    for d, name in roots:
        if d is None:
            continue
        for form in {str(Path(d).absolute()), str(Path(d).resolve())}:
            if form != "/" and form not in seen:
                seen.add(form)
                pairs.append((form, name))
    return pairs


def portable(obj: Any, roots: list[tuple[str, str]]) -> Any:
    """``obj`` (JSON-like) with every absolute path in its strings rewritten by ``roots``
    (:func:`path_roots`); an absolute path under none of them is recorded by its last component only."""
    if isinstance(obj, dict):
        return {k: portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, roots) for v in obj]
    if not isinstance(obj, str) or "/" not in obj:
        return obj

    def one(m: re.Match) -> str:
        p = m.group(0)
        for root, name in roots:
            if p == root or p.startswith(root + "/"):
                rest = p[len(root) + 1:]
                if name:
                    return f"{name}/{rest}" if rest else name
                return rest or "."
        return p.rstrip("/").rsplit("/", 1)[-1] or "."

    return _ABSOLUTE.sub(one, obj)


def save_png(fig: Any, path: Path) -> None:
    """Write a matplotlib figure to ``path`` as PNG (atomically, 110 dpi, tight bounding box) and close it."""
    import matplotlib.pyplot as plt

    from diffgap.core.fsutil import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
