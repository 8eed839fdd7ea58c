"""diffgap.runtime.gpu_libs: pip's TensorRT libraries become loadable without LD_LIBRARY_PATH.

Real shared libraries, built here with the C compiler, stand where pip puts TensorRT's: a package
``tensorrt_libs`` holding ``libnvinfer.so.10`` (soname ``libnvinfer.so.10``), and a "provider" library
that names ``libnvinfer.so.10`` as a needed library and has no run path, as onnxruntime's TensorRT
provider library does. Each check runs in a fresh interpreter with no LD_LIBRARY_PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler (cc/gcc) to build the stand-in libraries")


def _build(tmp: Path, with_nvinfer: bool = True) -> tuple[Path, Path]:
    """(site folder holding tensorrt_libs/, provider library outside it)."""
    site = tmp / "site"
    pkg = site / "tensorrt_libs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (tmp / "nvinfer.c").write_text("int nvinfer_version(void) { return 10; }\n")
    (tmp / "provider.c").write_text("int nvinfer_version(void);\nint provider_probe(void) { return nvinfer_version() + 1; }\n")
    lib = pkg / "libnvinfer.so.10"
    subprocess.run([CC, "-shared", "-fPIC", "-Wl,-soname,libnvinfer.so.10", "-o", str(lib), str(tmp / "nvinfer.c")], check=True)
    provider = tmp / "provider" / "libprovider.so"
    provider.parent.mkdir()
    # linked against the library by soname, with no run path: the loader must find it by itself
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(provider), str(tmp / "provider.c"), str(lib)], check=True)
    if not with_nvinfer:
        lib.unlink()
    return site, provider


def _python(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_provider_library_loads_only_after_the_preload(tmp_path):
    site, provider = _build(tmp_path)
    before = _python(site, f"import ctypes; ctypes.CDLL({str(provider)!r})")
    assert before.returncode != 0 and "libnvinfer.so.10: cannot open shared object file" in before.stderr
    after = _python(site, (
        "import ctypes\n"
        "from diffgap.runtime.gpu_libs import preload_tensorrt_libs, tensorrt_libs_dir\n"
        "loaded = preload_tensorrt_libs()\n"
        "assert [p.name for p in loaded] == ['libnvinfer.so.10'], loaded\n"
        "assert preload_tensorrt_libs() is loaded  # once per process\n"
        f"print(ctypes.CDLL({str(provider)!r}).provider_probe(), tensorrt_libs_dir())\n"
    ))
    assert after.returncode == 0, after.stderr
    probe, folder = after.stdout.split()
    assert probe == "11" and Path(folder) == site / "tensorrt_libs"


def test_a_tensorrt_libs_package_without_libnvinfer_is_an_error(tmp_path):
    site, _ = _build(tmp_path, with_nvinfer=False)
    p = _python(site, "from diffgap.runtime.gpu_libs import preload_tensorrt_libs\npreload_tensorrt_libs()")
    assert p.returncode != 0 and "has no libnvinfer.so.*" in p.stderr and "RuntimeError" in p.stderr


def test_no_tensorrt_libs_package_means_nothing_to_load(tmp_path):
    p = _python(tmp_path, "from diffgap.runtime.gpu_libs import preload_tensorrt_libs\nprint(preload_tensorrt_libs('no_such_libs_pkg'))")
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr
