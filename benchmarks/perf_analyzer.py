"""A private ``perf_analyzer`` (Triton's standard load generator) for the serving benchmarks and tests.

``python -m benchmarks.perf_analyzer ensure-perf-analyzer`` (run by ``make setup``) unpacks the ``perf_analyzer`` binary
from the tritonclient **2.51.0** manylinux wheel (same release line as the tritonserver 2.51.0 bundled
in nvidia-pytriton 0.7.0) into a private directory, without installing that old client over the
newer one. The PyPI ``perf-analyzer`` package is an empty placeholder and newer tritonclient wheels
carry no binary.

The binary needs two shared libraries, linked into ``<dir>/lib``:

- ``libb64.so.0d``: nvidia-pytriton ships one under ``nvidia_pytriton.libs/`` with a hashed name.
- ``libcudart.so.12``: from the ``nvidia-cuda-runtime-cu12`` wheel (installed, or unpacked from a
  downloaded wheel). Offline, the CUDA 12 runtime nvidia-pytriton bundles for its own server is
  used instead; it defines the same ``libcudart.so.12`` symbol version the binary asks for.

With both on ``LD_LIBRARY_PATH`` it runs without a GPU. :func:`perf_analyzer` returns the binary
and the environment to run it with (what :mod:`benchmarks.serving` and the perf_analyzer test call).
It is benchmark tooling, not part of the installed ``diffgap`` package: it lives in the active
environment's ``share/diffgap/`` (or ``$DIFFGAP_TOOLS_DIR``), never inside an installed package.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from diffgap.core.fsutil import atomic_dir

log = logging.getLogger(__name__)

PERF_ANALYZER_VERSION = "2.51.0"
_WHEEL_MEMBER = f"tritonclient-{PERF_ANALYZER_VERSION}.data/data/bin/perf_analyzer"
_CUDART = "libcudart.so.12"
_B64 = "libb64.so.0d"


def tools_dir() -> Path:
    """Where the private tools live: inside the active environment, so each venv has its own."""
    override = os.environ.get("DIFFGAP_TOOLS_DIR")
    base = Path(override) if override else Path(sys.prefix) / "share" / "diffgap"
    return base / f"perf_analyzer-{PERF_ANALYZER_VERSION}"


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [Path(p) for p in paths]


def _find_in_site(rel_glob: str) -> Path | None:
    for sp in _site_packages():
        hits = sorted(sp.glob(rel_glob))
        if hits:
            return hits[0]
    return None


def _pip_download(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`pip download {spec}` failed: {tail[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`pip download {spec}` produced no wheel")
    return wheels[-1]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _cudart_source(scratch: Path) -> Path:
    """The libcudart.so.12 to link: the cu12 wheel (installed or downloaded), else pytriton's copy."""
    installed = _find_in_site(f"nvidia/cuda_runtime/lib/{_CUDART}")
    if installed is not None:
        return installed
    try:
        wheel = _pip_download("nvidia-cuda-runtime-cu12", scratch / "cudart")
        out = scratch / _CUDART
        _extract_member(wheel, f"nvidia/cuda_runtime/lib/{_CUDART}", out)
        return out
    except (RuntimeError, KeyError) as e:
        bundled = _find_in_site("nvidia_pytriton.libs/libcudart-*.so.12*")
        if bundled is None:
            raise RuntimeError(
                f"no {_CUDART} available ({e}); `pip install nvidia-cuda-runtime-cu12` and retry"
            ) from e
        log.warning("nvidia-cuda-runtime-cu12 unavailable (%s); using nvidia-pytriton's bundled %s", e, bundled.name)
        return bundled


def perf_analyzer_env(root: Path | None = None) -> dict[str, str]:
    root = root or tools_dir()
    env = dict(os.environ)
    lib = str(root / "lib")
    env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def _check(root: Path) -> str:
    """Run ``perf_analyzer --version``; return its version line or raise with the reason."""
    binary = root / "bin" / "perf_analyzer"
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                          env=perf_analyzer_env(root), timeout=60)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or "Perf Analyzer Version" not in out:
        raise RuntimeError(f"{binary} does not run (exit {proc.returncode}): {out.splitlines()[-1:] or out}")
    return next(l for l in out.splitlines() if "Perf Analyzer Version" in l).strip()


def ensure_perf_analyzer() -> Path:
    """Unpack perf_analyzer and its two libraries once (idempotent); return the binary's path."""
    root = tools_dir()
    binary = root / "bin" / "perf_analyzer"
    if binary.exists():
        try:
            log.info("perf_analyzer present at %s (%s)", binary, _check(root))
            return binary
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            log.warning("existing %s is broken (%s); reinstalling", binary, e)
    b64 = _find_in_site(f"nvidia_pytriton.libs/libb64-*.so.0d")
    if b64 is None:
        raise RuntimeError("libb64 not found under nvidia_pytriton.libs; `pip install nvidia-pytriton==0.7.0`")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffgap-pa-") as scratch_s, atomic_dir(root, overwrite=True) as tmp:
        scratch = Path(scratch_s)
        wheel = _pip_download(f"tritonclient=={PERF_ANALYZER_VERSION}", scratch / "tc")
        tmp.chmod(0o755)
        (tmp / "bin").mkdir()
        (tmp / "lib").mkdir()
        try:
            _extract_member(wheel, _WHEEL_MEMBER, tmp / "bin" / "perf_analyzer")
        except KeyError as e:
            raise RuntimeError(f"{wheel.name} has no {_WHEEL_MEMBER}; it is not the manylinux wheel") from e
        (tmp / "bin" / "perf_analyzer").chmod(0o755)
        # A copy, not a link: the private dir must survive a pip cache clean or wheel reinstall.
        shutil.copy2(b64, tmp / "lib" / _B64)
        shutil.copy2(_cudart_source(scratch), tmp / "lib" / _CUDART)
        version = _check(tmp)
    log.info("perf_analyzer installed at %s (%s)", binary, version)
    return binary


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the environment to run it with (installs it on first use)."""
    binary = ensure_perf_analyzer()
    return binary, perf_analyzer_env()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_analyzer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ensure-perf-analyzer", help="unpack perf_analyzer 2.51.0 into a private dir (idempotent)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "ensure-perf-analyzer":
        try:
            binary = ensure_perf_analyzer()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            print(f"ensure-perf-analyzer: error: {e}", file=sys.stderr)
            return 1
        env = perf_analyzer_env()
        print(binary)
        print(f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
