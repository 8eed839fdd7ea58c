"""The GPU smoke run: build every engine, check parity, time every backend, one JSON + markdown report.

Run by ``benchmarks/gpu_smoke.sh`` (``make gpu-smoke``); by hand::

    python benchmarks/gpu_smoke.py --out DIR [--export EXPORT_DIR] [--repeats 50] [--preset clap-512]

Every step is one row (``ok`` / ``failed`` / ``skipped``, with the reason); a failing row never stops
the rows after it, and the report is rewritten after every row, so a crash still leaves the rows
before it. What runs depends on what the host has:

* TensorRT + pycuda + a GPU: engines (fp16, fp32) are built, a second build must reuse them and a
  changed setting with rebuilding off must be refused; ``pytest -m gpu`` runs; the ``tensorrt``,
  ``tensorrt+graph`` rows are timed and compared with onnxruntime CPU FP32.
* onnxruntime (CPU, or -gpu with the CUDA / TensorRT providers): the ``ort-*`` rows.
* PyTorch with CUDA: the denoiser's K-step sampler (``DiffGAP.bridge``) of ``--preset`` with random
  weights, eager and as a CUDA graph (``torch.cuda.graphs``), replay checked against eager.

Anything missing gives ``skipped`` rows that say what and why (no GPU, no TensorRT, no onnx to build
the test export ...). Without ``--export`` the engines and ONNX rows use the small test export of
``tests/runtime_graphs.py`` (needs ``onnx``); the export and the engines go to a scratch folder
(``--work``), so the report folder holds only ``gpu_smoke.json``, ``gpu_smoke.md`` and the pytest logs. Works from a plain checkout too: when ``diffgap`` is not
installed, the repository's folders are mapped onto the ``diffgap`` package as pyproject.toml maps them.
Exit status: 1 if any row failed, else 0.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:  # imported as benchmarks.gpu_smoke, or run as a script (its folder is then sys.path[0])
    from .gpu_smoke_report import Report, Skip, compare, timed
except ImportError:
    from gpu_smoke_report import Report, Skip, compare, timed

ROOT = Path(__file__).resolve().parents[1]
# ORT backends and TensorRT rows, (backend, precision, options); the reference is ort-cpu fp32
BACKENDS = [("ort-cpu", "fp32", {}), ("ort-cuda", "fp32", {}), ("ort-trt", "fp16", {}),
            ("tensorrt", "fp16", {}), ("tensorrt", "fp16", {"cuda_graph": True}), ("tensorrt", "fp32", {})]


def use_checkout() -> bool:
    """Import ``diffgap`` from this checkout when it is not installed (pyproject's package-dir map)."""
    try:
        import diffgap.runtime  # noqa: F401
        return False
    except ModuleNotFoundError as e:
        if e.name not in ("diffgap", "diffgap.runtime"):
            raise
    sys.path.insert(0, str(ROOT))
    import diffgap

    diffgap.__path__.append(str(ROOT))  # diffgap.runtime -> runtime/, diffgap.export -> export/ ...
    return True


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # ImportError, or a library that fails to initialise
        return None if isinstance(e, ModuleNotFoundError) else f"unusable ({type(e).__name__}: {e})"[:160]
    return str(getattr(m, "__version__", "installed"))


# ------------------------------------------------------------------------------------------------
# the host
# ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    gpu = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
        gpu = q.stdout.strip().replace("\n", "; ") if q.returncode == 0 else None
    libs = {k: _version(k) for k in ("numpy", "onnx", "onnxruntime", "torch", "cupy", "tensorrt", "pycuda", "cuda.bindings")}
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "gpu": gpu, "libraries": libs,
            "ld_library_path": os.environ.get("LD_LIBRARY_PATH", "")}


def driver_devices() -> tuple[int, str]:
    """(CUDA devices the NVIDIA driver reports, what it said): ``cuInit`` + ``cuDeviceGetCount`` of
    libcuda through ctypes, so neither cuda-python nor pycuda (nor their CUDA majors) decide it."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return 0, f"no NVIDIA driver library ({e})"
    rc = lib.cuInit(0)
    if rc != 0:
        return 0, f"the NVIDIA driver's cuInit failed (CUresult {rc})"
    n, ver = ctypes.c_int(0), ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(n))
    lib.cuDriverGetVersion(ctypes.byref(ver))
    if rc != 0:
        return 0, f"cuDeviceGetCount failed (CUresult {rc})"
    return n.value, f"{n.value} CUDA device(s), driver API {ver.value // 1000}.{ver.value % 1000 // 10}"


def no_gpu_reason() -> str | None:
    """None if the NVIDIA driver reports a CUDA device, else what the driver and nvidia-smi said."""
    count, said = driver_devices()
    if count > 0:
        return None
    smi = "no nvidia-smi on PATH"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        smi = f"nvidia-smi -L: {(q.stdout or q.stderr).strip()[:200] or 'no output'}"
    return f"no GPU: {said}; {smi}"


def graph_reason() -> str | None:
    """Why the ``tensorrt+graph`` rows cannot run (cuda-python missing, or too new for the driver)."""
    from diffgap.runtime.cuda_graphs import unavailable_reason

    return unavailable_reason()


def trt_reason() -> str | None:
    from diffgap.runtime.trt_session import unavailable_reason

    return unavailable_reason()


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------
def load_export(path: str | None, work: Path) -> Any:
    from diffgap.core.manifest import Manifest

    if path:
        return Manifest.load(path, verify=True)
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise Skip("no export: pass --export EXPORT_DIR, or install onnx to build the small test export") from e
    sys.path.insert(0, str(ROOT / "tests"))
    import runtime_graphs

    # the tokenizer asset comes from laion-clap's vocabulary file; engines and timings do not need it
    return runtime_graphs.make_export(work / "export", tokenizer=runtime_graphs.have_clip_vocab())


def engines(rep: Report, man: Any, engine_dir: Path, opt_level: int) -> bool:
    why = trt_reason()
    if why:
        rep.add("build-engines", "skipped", why)
        return False

    def build() -> dict[str, Any]:
        from diffgap.runtime.engine import BuildSettings, build_engines

        ds = build_engines(man, precisions=("fp16", "fp32"), engine_dir=engine_dir, settings=BuildSettings(opt_level))
        return {"engines": [f"{d.action} {d.model} {d.precision}" for d in ds]}

    def reuse() -> dict[str, Any]:
        from diffgap.runtime.engine import BuildSettings, build_engines

        ds = build_engines(man, precisions=("fp16", "fp32"), engine_dir=engine_dir, settings=BuildSettings(opt_level))
        rebuilt = [f"{d.model} {d.precision}: {d.reason}" for d in ds if d.action != "reuse"]
        if rebuilt:
            raise RuntimeError(f"the second build did not reuse the cache: {rebuilt}")
        return {}

    def refuse() -> dict[str, Any]:
        from diffgap.runtime.engine import BuildSettings, build_engines

        try:
            build_engines(man, engine_dir=engine_dir, settings=BuildSettings((opt_level + 1) % 6), rebuild=False)
        except ValueError as e:
            return {"reason": f"refused as it should: {str(e)[:160]}"}
        raise RuntimeError("changed settings with rebuilding off were not refused")

    ok = rep.run("build-engines", build)["status"] == "ok"
    if ok:
        rep.run("build-engines-cached", reuse)
        rep.run("build-engines-no-rebuild", refuse)
    return ok


def junit_counts(path: Path) -> dict[str, dict[str, int]]:
    """``{test file: {passed, failed, skipped}}`` from pytest's junit xml (errors count as failed)."""
    import xml.etree.ElementTree as ET

    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = (case.get("classname") or "?").split(".")
        where = next((f"{x}.py" for x in parts if x.startswith("test_")), parts[-1])
        c = counts.setdefault(where, {"passed": 0, "failed": 0, "skipped": 0})
        kinds = {child.tag for child in case}
        c["failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"] += 1
    return counts


def pytest_gpu(rep: Report, man: Any, out: Path, work: Path, checkout: bool, engine_dir: Path | None, limit: float) -> None:
    def run() -> dict[str, Any]:
        if importlib.util.find_spec("pytest") is None:
            raise Skip("pytest is not installed")
        env = dict(os.environ, DIFFGAP_GPU_EXPORT=str(man.root), HF_HUB_OFFLINE="1")
        if engine_dir is not None:  # the engines built above: the GPU tests reuse them instead of rebuilding
            env["DIFFGAP_GPU_ENGINES"] = str(engine_dir)
        if checkout:  # the same package mapping for the child, through a sitecustomize on its path
            shim = work / "checkout_shim"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(
                f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport diffgap\ndiffgap.__path__.append({str(ROOT)!r})\n")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
        junit = out / "junit-gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests", f"--junitxml={junit}"]
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:  # keep what it printed: the log says where it was
            text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
            (out / "pytest-gpu.log").write_text(text + f"\n[gpu-smoke] killed after {limit:.0f} s\n")
            raise RuntimeError(f"pytest -m gpu ran past {limit:.0f} s (--pytest-timeout); see pytest-gpu.log") from None
        (out / "pytest-gpu.log").write_text(p.stdout + p.stderr)
        last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
        per_file = junit_counts(junit) if junit.exists() else {}
        ran = {f: c for f, c in per_file.items() if c["passed"] or c["failed"] or c["skipped"]}
        summary = "; ".join(f"{f}: {c['passed']} passed, {c['skipped']} skipped, {c['failed']} failed" for f, c in sorted(ran.items()))
        extra = {"tests": ran, "skipped_tests": sum(c["skipped"] for c in ran.values())}
        if p.returncode != 0:
            return {**extra, "status": "failed", "reason": f"pytest exit {p.returncode}: {last} ({summary}; see pytest-gpu.log)"}
        if " passed" not in last:
            return {**extra, "status": "skipped", "reason": f"every GPU test skipped: {last} ({summary}; reasons in pytest-gpu.log)"}
        return {**extra, "reason": f"{last} ({summary}; skip reasons in pytest-gpu.log)"}

    rep.run("pytest-gpu", run)


def backends(rep: Report, man: Any, engine_dir: Path, have_engines: bool, gpu_why: str | None, warmup: int, repeats: int) -> None:
    from diffgap.runtime.session import open_model

    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        ort, providers = None, []
    need = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}
    for name in sorted(man.models):
        io = man.model(name).io
        batches = sorted({1, io.opt_batch, io.max_batch})
        ref = None
        for backend, prec, opts in BACKENDS:
            label = backend + ("+graph" if opts.get("cuda_graph") else "")
            why = None
            if backend.startswith("ort-") and ort is None:
                why = "onnxruntime is not installed"
            elif backend in need and need[backend] not in providers:
                why = f"onnxruntime has no {need[backend]} (providers: {', '.join(providers)}); install onnxruntime-gpu"
            elif backend != "ort-cpu" and gpu_why:
                why = gpu_why
            elif backend == "tensorrt" and not have_engines:
                why = trt_reason() or "engines were not built (see the build-engines row)"
            elif opts.get("cuda_graph"):
                why = graph_reason()
            if why:
                rep.add("latency", "skipped", why, model=name, backend=label, precision=prec)
                continue
            try:
                sess = open_model(man, name, backend=backend, precision=prec, engine_dir=engine_dir, **opts)
            except Exception as e:
                rep.add("latency", "failed", f"open: {type(e).__name__}: {e}"[:600], model=name, backend=label, precision=prec)
                continue
            with sess:
                feeds = io.sample_inputs(io.opt_batch, seed=0)
                for b in batches:
                    fb = io.sample_inputs(b, seed=b)

                    def row(fb: dict = fb) -> dict[str, Any]:
                        t = timed(lambda: sess.infer(fb), warmup, repeats)
                        return {**t, "items_per_s": b / (t["median_ms"] / 1e3)}

                    rep.run("latency", row, model=name, backend=label, precision=prec, batch=b)
                if backend == "ort-cpu" and prec == "fp32":
                    ref = sess.infer(feeds)
                    continue

                def parity() -> dict[str, Any]:
                    if ref is None:
                        raise Skip("no ort-cpu fp32 reference on this host")
                    par, bad = compare(sess.infer(feeds), ref, prec)
                    return {"parity": par, "status": "failed" if bad else "ok", "reason": bad}

                rep.run("parity", parity, model=name, backend=label, precision=prec, batch=io.opt_batch)


def torch_baselines(rep: Report, preset: str, gpu_why: str | None, warmup: int, repeats: int, batches: list[int]) -> None:
    """The denoiser's K-step sampler in PyTorch on the GPU: eager, and replayed as one CUDA graph."""
    try:
        import torch
    except ImportError:
        rep.add("torch", "skipped", "PyTorch is not installed")
        return
    if gpu_why or not torch.cuda.is_available():
        rep.add("torch", "skipped", gpu_why or "no GPU: torch.cuda.is_available() is False")
        return
    try:
        from diffgap.config import get_preset
        from diffgap.models import DiffGAP

        torch.manual_seed(0)
        model = DiffGAP(get_preset(preset)).eval().cuda()
    except Exception as e:
        rep.add("torch", "failed", f"building the {preset} model: {type(e).__name__}: {e}"[:600])
        return
    cfg = model.config
    direction = sorted(model.denoisers)[0]
    steps = cfg.diffusion.sample_steps
    label = {"model": f"{preset} {direction} K={steps}", "precision": "fp32"}
    for b in batches:
        g = torch.Generator(device="cuda").manual_seed(b)
        cond = torch.nn.functional.normalize(torch.randn(b, cfg.embed_dim, device="cuda", generator=g), dim=-1)
        noise = torch.randn(b, cfg.heads.dim, device="cuda", generator=g)

        def eager() -> Any:
            with torch.inference_mode():
                y = model.bridge(direction, cond, noise, steps=steps)
            torch.cuda.synchronize()
            return y

        def eager_row() -> dict[str, Any]:
            t = timed(eager, warmup, repeats)
            return {**t, "items_per_s": b / (t["median_ms"] / 1e3)}

        rep.run("torch", eager_row, backend="torch-eager", batch=b, **label)

        def graph_row() -> dict[str, Any]:
            static_c, static_n = cond.clone(), noise.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream before capture (torch.cuda.graphs docs)
                    model.bridge(direction, static_c, static_n, steps=steps)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                static_y = model.bridge(direction, static_c, static_n, steps=steps)

            def replay() -> None:
                static_c.copy_(cond)
                static_n.copy_(noise)
                graph.replay()
                torch.cuda.synchronize()

            replay()
            diff = float((static_y - eager()).abs().max())
            t = timed(replay, warmup, repeats)
            bad = "" if diff <= 1e-5 else f"graph replay differs from eager by {diff:.3g}"
            return {**t, "items_per_s": b / (t["median_ms"] / 1e3), "parity": {"max_abs_vs_eager": diff},
                    "status": "failed" if bad else "ok", "reason": bad}

        rep.run("torch", graph_row, backend="torch-cuda-graph", batch=b, **label)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="report folder (gpu_smoke.json, gpu_smoke.md, logs)")
    ap.add_argument("--export", help="a `diffgap export` directory (default: the small test export, built here)")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per row (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls first (default: %(default)s)")
    ap.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="TensorRT builder optimisation level")
    ap.add_argument("--preset", default="clap-512", help="model preset of the PyTorch baselines (default: %(default)s)")
    ap.add_argument("--torch-batches", default="1,8,64", help="batch sizes of the PyTorch rows (default: %(default)s)")
    ap.add_argument("--skip-pytest", action="store_true", help="do not run `pytest -m gpu`")
    ap.add_argument("--pytest-timeout", type=float, default=3600, help="seconds `pytest -m gpu` may run (default: %(default)s; "
                                                                          "a real export's engines take minutes each to build)")
    ap.add_argument("--work", help="scratch folder for the test export and the engines (default: a temporary folder, "
                                   "removed at the end; the report folder only gets the report and the logs)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    checkout = use_checkout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out, {"repeats": args.repeats, "warmup": args.warmup, "opt_level": args.opt_level, "preset": args.preset,
                       "export": args.export or "tests/runtime_graphs.py test export", "diffgap_from_checkout": checkout})
    rep.machine = machine()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="diffgap-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(rep, args, out, work, checkout)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _run(rep: Report, args: argparse.Namespace, out: Path, work: Path, checkout: bool) -> int:
    gpu_why = no_gpu_reason()
    rep.add("gpu", "skipped" if gpu_why else "ok", gpu_why or (rep.machine["gpu"] or "a CUDA device is visible"))
    man = None
    try:
        man = load_export(args.export, work)
        note = "" if "tokenizer" in man.assets else "; no tokenizer asset (laion-clap's vocabulary is not installed)"
        rep.add("export", "ok", f"{man.root} ({', '.join(sorted(man.models))}){note}")
    except Skip as e:
        rep.add("export", "skipped", str(e))
    except Exception as e:
        rep.add("export", "failed", f"{type(e).__name__}: {e}"[:600])
    engine_dir = work / "engines"
    if man is not None:
        have = engines(rep, man, engine_dir, args.opt_level)
        if args.skip_pytest:
            rep.add("pytest-gpu", "skipped", "--skip-pytest")
        else:
            pytest_gpu(rep, man, out, work, checkout, engine_dir if have else None, args.pytest_timeout)
        backends(rep, man, engine_dir, have, gpu_why, args.warmup, args.repeats)
    torch_baselines(rep, args.preset, gpu_why, args.warmup, args.repeats, [int(b) for b in args.torch_batches.split(",")])
    s = rep.summary()
    print(f"[gpu-smoke] {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped; report: {out}/gpu_smoke.md, {out}/gpu_smoke.json")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
