"""TensorRT engines and the TensorRT / ORT-CUDA sessions on a real GPU.

Every test here is ``@pytest.mark.gpu``: tests/conftest.py skips them with a reason where TensorRT,
pycuda or a CUDA device is missing. On a GPU host (``benchmarks/gpu_smoke.sh``) they build engines
from the small test export (tests/runtime_graphs.py; strongly typed FP16 graphs with FP32 I/O) and
check results, never timings.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

import runtime_graphs as rg
from diffgap.manifest import Manifest

pytestmark = pytest.mark.gpu

MODELS = ["diffgap_text_to_audio", "diffgap_audio_to_text", "clap_text_encoder", "clap_audio_encoder"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A test export with fp16 + fp32 engines built on this GPU (module scope: built once)."""
    from diffgap.runtime.engine import build_engines

    man = rg.make_export(tmp_path_factory.mktemp("gpu") / "export")
    decisions = build_engines(man.root, precisions=("fp16", "fp32"))
    return man, decisions


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_engine_build_and_cache(built):
    from diffgap.runtime.engine import (
        TIMING_CACHE, BuildSettings, EngineMeta, HostInfo, build_engines, engine_root, find_engine,
    )

    man, decisions = built
    host = HostInfo.current()
    assert {d.action for d in decisions} == {"build"} and len(decisions) == 2 * len(MODELS)
    for d in decisions:
        meta = EngineMeta.read(d.plan)
        meta.check_file(d.plan)
        assert meta.host == host and meta.io == man.model(d.model).io
        assert meta.key["onnx_sha256"] == man.files[man.model(d.model).file(d.precision)]["sha256"]
        assert find_engine(man, d.model, d.precision) == d.plan
    assert (engine_root(man) / host.slug / TIMING_CACHE).stat().st_size > 0
    # same key: reused; other settings with rebuilding off: refused, nothing rebuilt
    again = build_engines(man.root, precisions=("fp16", "fp32"))
    assert {d.action for d in again} == {"reuse"}
    with pytest.raises(ValueError, match="rebuilding is off"):
        build_engines(man.root, models=["clap_text_encoder"], settings=BuildSettings(opt_level=1), rebuild=False)


def test_trt_fp16_matches_ort_fp32(built):
    """Cosine >= 0.999 per row between the TensorRT FP16 engine and ORT's FP32 graph."""
    from diffgap.runtime.session import open_model

    man, _ = built
    for name in MODELS:
        io = man.model(name).io
        with open_model(man.root, name, backend="tensorrt", precision="fp16") as trt16, \
                open_model(man.root, name, backend="ort-cpu", precision="fp32") as ort32:
            for batch in sorted({io.min_batch, io.opt_batch, io.max_batch, 3}):
                feeds = io.sample_inputs(batch, seed=batch)
                a, b = trt16.infer(feeds), ort32.infer(feeds)
                for t in io.outputs:
                    assert a[t.name].dtype == t.np_dtype and a[t.name].shape == t.concrete(batch)
                    assert _cos(a[t.name], b[t.name]).min() >= 0.999, (name, batch, t.name)


def test_trt_fp32_matches_ort_fp32(built):
    from diffgap.runtime.session import open_model

    man, _ = built
    for name in MODELS:
        io = man.model(name).io
        with open_model(man.root, name, backend="tensorrt", precision="fp32") as t, \
                open_model(man.root, name, backend="ort-cpu") as o:
            feeds = io.sample_inputs(io.opt_batch, seed=1)
            for k, v in t.infer(feeds).items():
                # TF32 may be used by TensorRT's fp32 GEMMs on Ampere+: 10-bit mantissa inputs
                np.testing.assert_allclose(v, o.infer(feeds)[k], atol=5e-3)


def test_cuda_graph_replay_equals_plain_execution(built):
    from diffgap.runtime.engine import find_engine
    from diffgap.runtime.trt_session import TrtSession

    man, _ = built
    plan = find_engine(man, "diffgap_text_to_audio", "fp16")
    with TrtSession(plan, cuda_graph=False) as plain, TrtSession(plan, cuda_graph=True) as graphed:
        for batch in (4, 1, 4, 16, 4):  # repeated sizes replay the captured graph
            feeds = plain.io.sample_inputs(batch, seed=batch)
            a, b = plain.infer(feeds), graphed.infer(feeds)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        assert sorted(graphed._graphs) == [1, 4, 16]
        # new inputs through an already captured graph give new, correct outputs
        feeds = plain.io.sample_inputs(4, seed=99)
        np.testing.assert_array_equal(plain.infer(feeds)["embedding"], graphed.infer(feeds)["embedding"])


def test_trt_session_bad_inputs(built):
    from diffgap.runtime.session import open_model

    man, _ = built
    with open_model(man.root, "diffgap_text_to_audio", backend="tensorrt", precision="fp16") as s:
        feeds = s.io.sample_inputs(2, include_optional=False)
        with pytest.raises(ValueError, match="dtype float64"):
            s.infer({**feeds, "noise": feeds["noise"].astype(np.float64)})
        with pytest.raises(ValueError, match="has rank 1"):
            s.infer({**feeds, "noise": feeds["noise"][0]})
        with pytest.raises(ValueError, match="outside the declared profile"):
            s.infer(s.io.sample_inputs(s.max_batch + 1))
        bad = feeds["condition"].copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN/Inf"):
            s.infer({**feeds, "condition": bad})


def test_truncated_foreign_and_stale_engines(built, tmp_path):
    from diffgap.runtime.engine import EngineMeta, HostInfo, find_engine
    from diffgap.runtime.trt_session import TrtSession

    man, _ = built
    root = tmp_path / "export"
    shutil.copytree(man.root, root)
    man2 = Manifest.load(root)
    plan = find_engine(man2, "clap_text_encoder", "fp16")
    # truncated: the sidecar's sha256 no longer matches
    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or replaced"):
        TrtSession(plan)
    # garbage whose sidecar was "fixed up": TensorRT itself refuses it
    plan.write_bytes(b"\0" * 4096)
    meta = EngineMeta.read(plan)
    meta.engine_sha256, meta.engine_bytes = hashlib.sha256(b"\0" * 4096).hexdigest(), 4096
    meta.write(plan)
    with pytest.raises(ValueError, match="could not deserialize"):
        TrtSession(plan)
    # built for another GPU / TensorRT
    plan.write_bytes(data)
    meta.engine_sha256, meta.engine_bytes = hashlib.sha256(data).hexdigest(), len(data)
    here = HostInfo.current()
    meta.key = {**meta.key, "gpu_name": "Some Other GPU", "trt_version": "10.12.0"}
    meta.write(plan)
    with pytest.raises(ValueError, match=rf"built for Some Other GPU .* but this host is {here.gpu_name}"):
        TrtSession(plan)
    # export changed after the build: stale
    d = json.loads((root / "manifest.json").read_text())
    d["files"]["clap_text_encoder.fp16.onnx"]["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="built from another version"):
        find_engine(Manifest.load(root), "clap_text_encoder", "fp16")


def test_pipeline_on_tensorrt_matches_ort(built):
    from diffgap.runtime.pipeline import TextToAudioBridge

    man, _ = built
    texts = ["a dog barks", "a violin plays a slow melody", "traffic noise"]
    with TextToAudioBridge(man.root, backend="tensorrt", precision="fp16", seed=3) as t, \
            TextToAudioBridge(man.root, seed=3) as o:
        a, b = t(texts), o(texts)
    assert _cos(a.bridged, b.bridged).min() >= 0.999 and _cos(a.projected, b.projected).min() >= 0.999


def test_ort_cuda_backend_matches_cpu(built):
    import onnxruntime as ort

    from diffgap.runtime.session import open_model

    man, _ = built
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    with open_model(man.root, "diffgap_text_to_audio", backend="ort-cuda") as c, \
            open_model(man.root, "diffgap_text_to_audio") as o:
        assert c.providers[0] == "CUDAExecutionProvider"
        feeds = c.io.sample_inputs(8, seed=2)
        np.testing.assert_allclose(c.infer(feeds)["embedding"], o.infer(feeds)["embedding"], atol=1e-4)
