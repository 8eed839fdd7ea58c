"""The GPU extras' pins (pyproject.toml), read with ``packaging``: each extra pairs ONE CUDA major.

A process loads one CUDA runtime, and every GPU wheel is built for one CUDA major: TensorRT's by its
name (``tensorrt-cu12`` / ``tensorrt-cu13``; the plain ``tensorrt`` metapackage pulls ``tensorrt_cu13``
for 10.16 and 11.x alike), cuda-python's by its own major version, onnxruntime-gpu's by release (its
``[cuda]`` extra names the CUDA wheels it was built for: ``-cu12`` up to 1.26, CUDA 13 from 1.27).
These tests check the specifiers themselves; ``make gpu-resolve`` checks that pip resolves them.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = {"gpu": 13, "gpu-trt10": 12}   # extra -> the CUDA major it is for
TRT_MAJOR = {"gpu": 11, "gpu-trt10": 10}


def ort_cuda_major(v: Version) -> int | None:
    """onnxruntime-gpu's CUDA major per release, as its wheels' ``[cuda]`` extra names it
    (1.21-1.26: ``nvidia-cuda-runtime-cu12``; 1.27: ``-cu13``; 1.28+: ``nvidia-cuda-runtime~=13.0``);
    1.19/1.20 are CUDA 12 builds too (ORT's install docs: CUDA 12 is the default from 1.19)."""
    if v < Version("1.19"):
        return None  # CUDA 11 default builds: never wanted
    return 12 if v < Version("1.27") else 13


def _requirements(extra: str) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return {canonicalize_name(r.name): r for r in reqs}


def _allowed(spec: SpecifierSet, candidates: list[str]) -> list[Version]:
    return [Version(c) for c in candidates if Version(c) in spec]


ORT_RELEASES = [f"1.{m}.0" for m in range(15, 40)]
CUDA_PYTHON_RELEASES = ["11.8.7", *(f"12.{m}.0" for m in range(10)), "12.6.2.post1", "12.9.10", *(f"13.{m}.0" for m in range(10)), "14.0.0"]
TRT_RELEASES = ["8.6.1", "10.0.1", "10.11.0.33", "10.12.0.36", "10.16.1.11", "11.0.0.114", "11.4.0.106", "12.0.0"]


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_gpu_extra_pairs_one_cuda_major(extra):
    cuda = EXTRAS[extra]
    reqs = _requirements(extra)
    # TensorRT by its CUDA-specific name, never the metapackage (it always pulls tensorrt_cu13)
    assert "tensorrt" not in reqs, "the `tensorrt` metapackage depends on tensorrt_cu13 whatever its version"
    trt = reqs[f"tensorrt-cu{cuda}"]
    assert {v.major for v in _allowed(trt.specifier, TRT_RELEASES)} == {TRT_MAJOR[extra]}
    assert all(v >= Version("10.12") for v in _allowed(trt.specifier, TRT_RELEASES)), "strongly typed networks need 10.12+"
    # cuda-python: its major version is the CUDA major of its bindings
    cp = reqs["cuda-python"]
    allowed = _allowed(cp.specifier, CUDA_PYTHON_RELEASES)
    assert allowed and {v.major for v in allowed} == {cuda}, (extra, cp)
    # onnxruntime-gpu: only releases built for this CUDA major, with the wheels of its CUDA/cuDNN libraries
    ort = reqs["onnxruntime-gpu"]
    allowed = _allowed(ort.specifier, ORT_RELEASES)
    assert allowed and {ort_cuda_major(v) for v in allowed} == {cuda}, (extra, ort)
    assert ort.extras == {"cuda", "cudnn"}, "without [cuda,cudnn] the CUDA provider finds no CUDA/cuDNN libraries"
    assert min(allowed) >= Version("1.21"), "the [cuda,cudnn] extras and onnxruntime.preload_dlls() exist from 1.21"
    # nothing else in the extra names another CUDA major
    for name in reqs:
        for other in {12, 13} - {cuda}:
            assert f"cu{other}" not in name, (extra, name)


def test_gpu_extra_skips_the_placeholder_cuda13_wheels():
    """onnxruntime-gpu 1.27's [cuda] extra names ``nvidia-cuda-runtime-cu13`` & co, which PyPI holds only
    as empty 0.0.x placeholders; 1.28+ names the real CUDA 13 wheels (``nvidia-cuda-runtime`` 13.x)."""
    assert Version("1.27.0") not in _requirements("gpu")["onnxruntime-gpu"].specifier


def test_tensorrt_11_only_in_the_gpu_extra():
    """TensorRT 11 needs onnxruntime >= 1.27 (weak typing removed): pip may never pair it with an older one."""
    for extra in EXTRAS:
        reqs = _requirements(extra)
        trt11 = any(v.major >= 11 for v in _allowed(reqs[f"tensorrt-cu{EXTRAS[extra]}"].specifier, TRT_RELEASES))
        old_ort = any(v < Version("1.27") for v in _allowed(reqs["onnxruntime-gpu"].specifier, ORT_RELEASES))
        assert not (trt11 and old_ort), extra


def test_requires_python_matches_the_gpu_wheels():
    """onnxruntime-gpu >= 1.26 and cuda-bindings 13.5 publish wheels for Python >= 3.11 only."""
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert "3.10.14" not in spec and "3.11.0" in spec and "3.12.1" in spec
