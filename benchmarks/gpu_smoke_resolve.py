"""Do the ``gpu`` and ``gpu-trt10`` extras resolve? pip's own resolver, no GPU needed (``make gpu-resolve``).

For each extra and each target Python (the lowest ``requires-python`` allows, and the next minor),
``pip install --dry-run --ignore-installed --report`` resolves the project's dependencies plus the
extra for a manylinux x86-64 CPython with ``--only-binary=:all:``, from PyPI alone (``--isolated``:
no local pip configuration, no extra index). Three packages of the extras are source-only on PyPI
and are handled first, on this interpreter, with ``--no-deps``:

- ``tensorrt-cuNN`` is an sdist whose metadata is static: pip builds it (setuptools, offline) and reads
  its two pins, ``tensorrt_cuNN_bindings==V`` (wheels on PyPI: resolved with the rest) and
  ``tensorrt_cuNN_libs==V``;
- ``tensorrt_cuNN_libs`` is a stub sdist whose build backend (wheel-stub) downloads the real wheel
  from NVIDIA's own index even to read its metadata, so only its release ``V`` is checked on PyPI
  (``pip index versions``), never its dependencies;
- ``pycuda`` ships no wheels; pip builds its metadata (no CUDA needed for that) and its
  dependencies join the wheel resolution.

Then the resolved set must hold one CUDA major: every ``nvidia-*-cuMM`` wheel, the unsuffixed CUDA 13
wheels (``nvidia-cuda-runtime`` 13.x ...), cuda-python/cuda-bindings and the TensorRT bindings agree
with the extra's TensorRT package.

What this proves: pip finds one consistent set of wheels (and the three sources) for the extra on
PyPI today, for those Pythons, with one CUDA major. What it does not: the real TensorRT libs wheel's
own dependencies (NVIDIA's index serves them), that pycuda compiles (needs nvcc, g++ and the Python
headers), that the host's driver is new enough (CUDA 12: >= 525.60.13, CUDA 13: >= 580.65.06), or
that anything loads or runs. Needs network access to PyPI; pip downloads wheels whose metadata the
index does not serve separately, into pip's cache.

    python benchmarks/gpu_smoke_resolve.py [--extra gpu] [--python 3.11] [--out DIR]

Exit status 0 when every extra resolves to one CUDA major, 1 otherwise; a JSON summary per extra and
Python in ``--out`` (default: none written).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("gpu", "gpu-trt10")
# PEP 600 tags a manylinux x86-64 host accepts; pip matches --platform literally, so list the ones the
# GPU wheels use (onnxruntime-gpu: 2_27/2_28, NVIDIA's CUDA wheels: 2_17 / manylinux2014).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SOURCE_ONLY = ("pycuda",)
CUDA13_UNSUFFIXED = re.compile(r"^nvidia-(cuda-[a-z]+|cublas|cufft|curand|cusolver|cusparse|nvjitlink|npp|nvjpeg)$")


def pip(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


def dry_run(reqs: list[str], *extra_args: str) -> list[dict[str, Any]]:
    """pip's resolution report (the ``install`` list); RuntimeError with pip's own error otherwise."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        p = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *extra_args, *reqs)
        if p.returncode != 0:
            err = [line for line in (p.stderr or p.stdout).splitlines() if line.startswith("ERROR")] or p.stderr.splitlines()[-5:]
            raise RuntimeError(" / ".join(err)[:1500])
        return json.loads(report.read_text())["install"]


@functools.lru_cache(maxsize=None)
def source_metadata(req: str) -> dict[str, Any]:
    """Name, version, Requires-Dist of the release pip picks for a source-only requirement (built here, once)."""
    (item,) = dry_run([req], "--no-deps")
    md = item["metadata"]
    return {"name": md["name"], "version": md["version"], "requires_dist": md.get("requires_dist", [])}


def release_exists(name: str, version: str) -> bool:
    p = pip("index", "versions", name)
    if p.returncode != 0:
        raise RuntimeError(f"pip index versions {name}: {p.stderr.strip()[-300:]}")
    listed = re.search(r"Available versions: (.*)", p.stdout)
    return bool(listed) and version in [v.strip() for v in listed.group(1).split(",")]


def cuda_major_of(name: str, version: str) -> int | None:
    """The CUDA major a resolved wheel is built for, if its name or version says so."""
    m = re.search(r"[-_]cu(\d+)$", name)
    if m:
        return int(m.group(1))
    if name in ("cuda-python", "cuda-bindings"):
        return Version(version).major
    if CUDA13_UNSUFFIXED.match(name):
        return 13  # CUDA 13 dropped the -cuNN suffix; these names exist only for 13.x and later
    return None


def check_extra(extra: str, python: str, project: dict[str, Any]) -> dict[str, Any]:
    base = [Requirement(r) for r in project["dependencies"]]
    reqs = [Requirement(r) for r in project["optional-dependencies"][extra]]
    wanted: list[str] = [str(r) for r in base]
    notes: list[str] = []
    trt_major = None
    for r in reqs:
        name = canonicalize_name(r.name)
        if re.fullmatch(r"tensorrt-cu\d+", name):
            trt_major = int(name.rsplit("cu", 1)[1])
            meta = source_metadata(str(r))
            pins = [Requirement(d) for d in meta["requires_dist"] if "extra ==" not in d]
            for pin in pins:
                if canonicalize_name(pin.name).endswith("-libs"):
                    (v,) = [s.version for s in pin.specifier]
                    if not release_exists(pin.name, v):
                        raise RuntimeError(f"{meta['name']} {meta['version']} pins {pin}, which PyPI does not list")
                    notes.append(f"{pin} exists on PyPI (a stub sdist: its own dependencies come from NVIDIA's index, not checked)")
                else:
                    wanted.append(str(pin))
            notes.append(f"{meta['name']} {meta['version']} (sdist, static metadata) -> {', '.join(map(str, pins))}")
        elif name in SOURCE_ONLY:
            meta = source_metadata(str(r))
            wanted += [d for d in meta["requires_dist"] if "extra ==" not in d]
            notes.append(f"{meta['name']} {meta['version']} (sdist, compiles at install) -> {', '.join(meta['requires_dist'])}")
        else:
            wanted.append(str(r))
    if trt_major is None:
        raise RuntimeError(f"extra {extra!r} names no tensorrt-cuNN package")
    if python not in SpecifierSet(project["requires-python"]):
        raise RuntimeError(f"Python {python} is outside requires-python {project['requires-python']}")
    tag = "cp" + python.replace(".", "")
    args = ["--python-version", python, "--implementation", "cp", "--abi", tag, "--abi", "abi3", "--abi", "none",
            *[a for p in PLATFORMS for a in ("--platform", p)], "--only-binary=:all:"]
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in dry_run(wanted, *args)}
    majors = {n: cuda_major_of(n, v) for n, v in resolved.items()}
    foreign = {n: f"{resolved[n]} (CUDA {m})" for n, m in majors.items() if m is not None and m != trt_major}
    return {"extra": extra, "python": python, "cuda_major": trt_major, "resolved": resolved,
            "cuda_wheels": sorted(n for n, m in majors.items() if m is not None), "other_cuda_major": foreign, "notes": notes,
            "ok": not foreign}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", action="append", choices=EXTRAS, help="extra to check (default: both)")
    ap.add_argument("--python", action="append", help="target Python X.Y (default: the lowest requires-python allows, and the next)")
    ap.add_argument("--out", help="write gpu_resolve.json here")
    args = ap.parse_args(argv)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    low = re.search(r">=\s*3\.(\d+)", project["requires-python"])
    pythons = args.python or ([f"3.{int(low.group(1))}", f"3.{int(low.group(1)) + 1}"] if low else ["3.12"])
    results, failed = [], 0
    for extra in args.extra or EXTRAS:
        for py in pythons:
            try:
                r = check_extra(extra, py, project)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                r = {"extra": extra, "python": py, "ok": False, "error": str(e)}
            results.append(r)
            if r["ok"]:
                pins = ", ".join(f"{n} {r['resolved'][n]}" for n in r["cuda_wheels"])
                print(f"[gpu-resolve] ok      {extra} (CUDA {r['cuda_major']}) on Python {py}: {len(r['resolved'])} wheels, "
                      f"onnxruntime-gpu {r['resolved'].get('onnxruntime-gpu')}; CUDA wheels: {pins}")
                for n in r["notes"]:
                    print(f"[gpu-resolve]         {n}")
            else:
                failed += 1
                why = r.get("error") or f"wheels of another CUDA major: {r['other_cuda_major']}"
                print(f"[gpu-resolve] FAILED  {extra} on Python {py}: {why}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_resolve.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"[gpu-resolve] {len(results) - failed} resolved, {failed} failed (pip's dry-run resolution from PyPI; "
          f"not checked: the real TensorRT libs wheel's dependencies, building pycuda, the driver, loading anything)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
