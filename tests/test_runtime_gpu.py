"""TensorRT engines and the TensorRT / ORT-CUDA sessions on a real GPU.

Every test here is ``@pytest.mark.gpu``: tests/conftest.py skips them with a reason where TensorRT,
pycuda or a CUDA device is missing. On a GPU host (``benchmarks/gpu_smoke.sh``) they build engines
(into a temporary engine directory) for the export named by ``DIFFGAP_GPU_EXPORT`` — a real
``diffgap export`` directory — or, without it, for the small test export of tests/runtime_graphs.py
(strongly typed FP16 graphs with FP32 I/O), and check results, never timings.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtime_graphs as rg
from diffgap.core.iospec import ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLES
from diffgap.core.manifest import Manifest

pytestmark = pytest.mark.gpu

SAMPLER = "diffgap_text_to_audio"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(manifest, build decisions, engine dir): fp16 + fp32 engines for this GPU, once per module.

    ``DIFFGAP_GPU_ENGINES`` names an engine folder already built for this export (the smoke run passes
    its own): those engines are reused, not rebuilt."""
    from diffgap.runtime.engine import build_engines

    tmp = tmp_path_factory.mktemp("gpu")
    if os.environ.get("DIFFGAP_GPU_EXPORT"):
        man = Manifest.load(os.environ["DIFFGAP_GPU_EXPORT"], verify=True)
    else:
        man = rg.make_export(tmp / "export", tokenizer=rg.have_clip_vocab())
    engines = Path(os.environ["DIFFGAP_GPU_ENGINES"]) if os.environ.get("DIFFGAP_GPU_EXPORT") and os.environ.get("DIFFGAP_GPU_ENGINES") \
        else tmp / "engines"
    decisions = build_engines(man, precisions=("fp16", "fp32"), engine_dir=engines)
    return man, decisions, engines


def _trt_major() -> int:
    import tensorrt

    return int(tensorrt.__version__.split(".")[0])


def _copy_export(man: Manifest, engines: Path, dst: Path) -> tuple[Manifest, Path]:
    shutil.copytree(man.root, dst / "export", ignore=shutil.ignore_patterns("engines"))
    shutil.copytree(engines, dst / "engines")
    return Manifest.load(dst / "export"), dst / "engines"


def _feeds(io, batch: int, seed: int) -> dict[str, np.ndarray]:
    """IOSpec samples, with unit-norm conditions (as CLAP emits) and guidance 1 / 3 per row (the
    export's own denoiser check feeds) for the samplers."""
    feeds = io.sample_inputs(batch, seed=seed)
    if ROLES not in io.meta:  # an encoder: its own samples
        return feeds
    cond = io.role(ROLE_CONDITION).name
    feeds[cond] = (feeds[cond] / np.linalg.norm(feeds[cond], axis=1, keepdims=True)).astype(np.float32)
    if io.has_role(ROLE_GUIDANCE):
        feeds[io.role(ROLE_GUIDANCE).name] = np.array([[1.0 if i % 2 == 0 else 3.0] for i in range(batch)], np.float32)
    return feeds


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_engine_build_and_cache(built):
    from diffgap.runtime.engine import (
        TIMING_CACHE, BuildSettings, EngineMeta, HostInfo, build_engines, engine_root, find_engine,
    )

    man, decisions, engines = built
    host = HostInfo.current()
    assert {d.action for d in decisions} <= {"build", "reuse"} and len(decisions) == 2 * len(man.models)
    for d in decisions:
        meta = EngineMeta.read(d.plan)
        meta.check_file(d.plan)
        assert meta.host == host and meta.io == man.model(d.model).io
        assert meta.key["onnx_sha256"] == man.files[man.model(d.model).file(d.precision)]["sha256"]
        assert find_engine(man, d.model, d.precision, engine_dir=engines) == d.plan
    assert (engine_root(man, engines) / host.slug / TIMING_CACHE).stat().st_size > 0
    # same key: reused; other settings with rebuilding off: refused, nothing rebuilt
    again = build_engines(man, precisions=("fp16", "fp32"), engine_dir=engines)
    assert {d.action for d in again} == {"reuse"}
    with pytest.raises(ValueError, match="rebuilding is off"):
        build_engines(man, models=[SAMPLER], settings=BuildSettings(opt_level=1), rebuild=False, engine_dir=engines)


def test_trt_fp16_matches_ort_fp32(built):
    """Cosine >= 0.999 per row between the TensorRT FP16 engine and ORT's FP32 graph."""
    from diffgap.runtime.session import open_model

    man, _, engines = built
    for name in sorted(man.models):
        io = man.model(name).io
        with open_model(man, name, backend="tensorrt", precision="fp16", engine_dir=engines) as trt16, \
                open_model(man, name, backend="ort-cpu", precision="fp32") as ort32:
            for batch in sorted({io.min_batch, io.opt_batch, io.max_batch, 3}):
                feeds = _feeds(io, batch, seed=batch)
                a, b = trt16.infer(feeds), ort32.infer(feeds)
                for t in io.outputs:
                    assert a[t.name].dtype == t.np_dtype and a[t.name].shape == t.concrete(batch)
                    assert _cos(a[t.name], b[t.name]).min() >= 0.999, (name, batch, t.name)


def test_trt_fp32_matches_ort_fp32(built):
    from diffgap.runtime.session import open_model

    man, _, engines = built
    for name in sorted(man.models):
        io = man.model(name).io
        with open_model(man, name, backend="tensorrt", precision="fp32", engine_dir=engines) as t, \
                open_model(man, name, backend="ort-cpu") as o:
            feeds = _feeds(io, io.opt_batch, seed=1)
            for k, v in t.infer(feeds).items():
                # TF32 may be used by TensorRT's fp32 GEMMs on Ampere+: 10-bit mantissa inputs
                np.testing.assert_allclose(v, o.infer(feeds)[k], atol=5e-3)


def test_cuda_graph_replay_equals_plain_execution(built):
    """Graphs captured with cuda-python on the pycuda stream, one execution context per batch size:
    sizes alternate (4, 1, 4, max, 4) and every replay is compared with a plain enqueue of the same
    context on the same session, and with onnxruntime's FP32 graph.

    Tolerance: replay launches the kernels the plain enqueue runs, on the same buffers, so results
    agree to the last bit unless a kernel reduces in a nondeterministic order (split-K GEMMs with
    atomics): 2e-3 absolute is two FP16 ulps at 1.0, the scale of these unit-norm outputs. A graph
    replayed against another batch size's shapes (one shared context) is off by far more."""
    pytest.importorskip("cuda.bindings.runtime", reason="CUDA-graph mode needs cuda-python (pip install -e .[gpu])")
    from diffgap.runtime.engine import find_engine
    from diffgap.runtime.session import open_model
    from diffgap.runtime.trt_session import TrtSession

    man, _, engines = built
    plan = find_engine(man, SAMPLER, "fp16", engine_dir=engines)
    with TrtSession(plan, cuda_graph=True) as s, open_model(man, SAMPLER) as ref:
        top = s.max_batch
        for batch in (4, 1, 4, top, 4):  # repeated sizes replay the graph captured first
            feeds = _feeds(s.io, batch, seed=batch)
            graphed, plain, want = s.infer(feeds), s.infer(feeds, cuda_graph=False), ref.infer(feeds)
            for k in graphed:
                np.testing.assert_allclose(graphed[k], plain[k], rtol=0, atol=2e-3, err_msg=f"batch {batch} {k}")
                assert _cos(graphed[k], want[k]).min() >= 0.999, (batch, k)
        assert sorted(s._graphs) == sorted({1, 4, top}) and sorted(s._per_batch.contexts) == sorted({1, 4, top})
        # new inputs through an already captured graph give new, correct outputs
        feeds = _feeds(s.io, 4, seed=99)
        out = s.io.role(ROLE_BRIDGED).name
        np.testing.assert_allclose(s.infer(feeds)[out], s.infer(feeds, cuda_graph=False)[out], rtol=0, atol=2e-3)
        graphs = list(s._graphs.values())
    assert graphs and all(g.closed for g in graphs), "closing the session destroys its graph execs"


def test_builds_and_lookups_use_the_requested_device(built, tmp_path):
    """device=N makes GPU N current for the build (the CUDA runtime TensorRT uses sees N) and keys
    the cache by GPU N; the last visible device is used, so a multi-GPU host checks a non-zero one."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="needs cuda-python to ask the CUDA runtime")
    import pycuda.driver as cuda

    from diffgap.runtime.cuda_graphs import check
    from diffgap.runtime.engine import EngineMeta, HostInfo, build_engines, device_context, find_engine

    man, _, _ = built
    cuda.init()
    last = cuda.Device.count() - 1
    with device_context(last) as dev:
        assert cuda.Context.get_device().pci_bus_id() == dev.pci_bus_id() == cuda.Device(last).pci_bus_id()
        assert check(cudart.cudaGetDevice(), "cudaGetDevice") == last
    decisions = build_engines(man, models=[SAMPLER], engine_dir=tmp_path / "e", device=last)
    assert EngineMeta.read(decisions[0].plan).host == HostInfo.current(last)
    assert find_engine(man, SAMPLER, engine_dir=tmp_path / "e", device=last) == decisions[0].plan
    with pytest.raises(RuntimeError, match=f"no CUDA device {last + 1} visible"):
        build_engines(man, models=[SAMPLER], engine_dir=tmp_path / "e", device=last + 1)


def test_ort_trt_backend_runs_the_fp16_graph_typed(built, tmp_path):
    """ORT's TensorRT provider with the shared options (fp16 off, IOSpec profile, engine cache) runs the
    FP16 graph with its own types: only on TensorRT 11, where every network is strongly typed (on
    TensorRT 10 onnxruntime builds a weakly typed network and may run the FP16 nodes in FP32)."""
    import onnxruntime as ort

    from diffgap.runtime.session import open_model

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT provider (install onnxruntime-gpu)")
    if _trt_major() < 11:
        pytest.skip("typed FP16 through onnxruntime's TensorRT provider needs TensorRT 11 (the gpu extra); this is TensorRT 10")
    man, _, engines = built
    with open_model(man, SAMPLER, backend="ort-trt", precision="fp16", engine_dir=tmp_path) as t, \
            open_model(man, SAMPLER) as o, \
            open_model(man, SAMPLER, backend="tensorrt", precision="fp16", engine_dir=engines) as e:
        assert t.providers[0] == "TensorrtExecutionProvider"
        for batch in sorted({t.io.min_batch, t.io.opt_batch, t.io.max_batch}):
            feeds = _feeds(t.io, batch, seed=batch)
            a, b, c = t.infer(feeds), o.infer(feeds), e.infer(feeds)
            for k in a:
                assert _cos(a[k], b[k]).min() >= 0.999, (batch, k)
                # the same typed FP16 network as the strongly typed engine: FP16 rounding apart (2 ulps at 1.0)
                np.testing.assert_allclose(a[k], c[k], rtol=0, atol=2e-3, err_msg=f"batch {batch} {k}")
    assert any((tmp_path / "ort-trt-cache").iterdir()), "the provider cached its engine"


def test_ort_trt_backend_loads_pip_tensorrt_without_ld_library_path(built, tmp_path):
    """open_model(..., backend="ort-trt") in a fresh interpreter whose LD_LIBRARY_PATH holds no TensorRT
    folder: the runtime loads pip's libnvinfer itself (diffgap.runtime.gpu_libs)."""
    import subprocess
    import sys

    import onnxruntime as ort

    from diffgap.runtime.gpu_libs import tensorrt_libs_dir

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT provider (install onnxruntime-gpu)")
    folder = tensorrt_libs_dir()
    if folder is None:
        pytest.skip("TensorRT is not pip's here (no tensorrt_libs package): the system loader finds it")
    man, _, _ = built
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and Path(p) != folder)
    code = ("import sys\nfrom diffgap.runtime.session import open_model\n"
            f"s = open_model({str(man.root)!r}, {SAMPLER!r}, backend='ort-trt', precision='fp16', engine_dir={str(tmp_path)!r})\n"
            "print(s.providers[0])\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "TensorrtExecutionProvider", (p.stdout + p.stderr)[-3000:]


def test_trt_session_bad_inputs(built):
    from diffgap.runtime.session import open_model

    man, _, engines = built
    with open_model(man, SAMPLER, backend="tensorrt", precision="fp16", engine_dir=engines) as s:
        feeds = s.io.sample_inputs(2, include_optional=False)
        cond, noise = s.io.role(ROLE_CONDITION).name, s.io.role(ROLE_NOISE).name
        with pytest.raises(ValueError, match="dtype float64"):
            s.infer({**feeds, noise: feeds[noise].astype(np.float64)})
        with pytest.raises(ValueError, match="has rank 1"):
            s.infer({**feeds, noise: feeds[noise][0]})
        with pytest.raises(ValueError, match="outside the declared profile"):
            s.infer(s.io.sample_inputs(s.max_batch + 1))
        bad = feeds[cond].copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN/Inf"):
            s.infer({**feeds, cond: bad})


def test_truncated_foreign_and_stale_engines(built, tmp_path):
    from diffgap.runtime.engine import EngineMeta, HostInfo, find_engine
    from diffgap.runtime.trt_session import TrtSession

    man, _, engines = built
    man2, engines2 = _copy_export(man, engines, tmp_path)
    root = man2.root
    plan = find_engine(man2, SAMPLER, "fp16", engine_dir=engines2)
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
    with pytest.raises(ValueError, match=rf"built for Some Other GPU .* but this host is {re.escape(here.gpu_name)}"):
        TrtSession(plan)
    # export changed after the build: stale
    meta.key = {**meta.key, "gpu_name": here.gpu_name, "trt_version": here.trt_version}
    meta.write(plan)
    d = json.loads((root / "manifest.json").read_text())
    d["files"][man2.model(SAMPLER).file("fp16")]["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="built from another version"):
        find_engine(Manifest.load(root), SAMPLER, "fp16", engine_dir=engines2)


def test_pipeline_on_tensorrt_matches_ort(built):
    from diffgap.runtime.pipeline import TextToAudioBridge

    man, _, engines = built
    if "clap_text_encoder" not in man.models:
        pytest.skip("this export has no text encoder (exported with --encoders none)")
    if "tokenizer" not in man.assets:
        pytest.skip("this export has no tokenizer asset (laion-clap's vocabulary is not installed here)")
    texts = ["a dog barks", "a violin plays a slow melody", "traffic noise"]
    with TextToAudioBridge(man, backend="tensorrt", precision="fp16", seed=3, engine_dir=engines) as t, \
            TextToAudioBridge(man, seed=3) as o:
        a, b = t(texts), o(texts)
    assert _cos(a.bridged, b.bridged).min() >= 0.999 and _cos(a.projected, b.projected).min() >= 0.999


def test_ort_cuda_backend_matches_cpu(built):
    import onnxruntime as ort

    from diffgap.runtime.session import open_model

    man, _, _ = built
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    with open_model(man, SAMPLER, backend="ort-cuda") as c, open_model(man, SAMPLER) as o:
        assert c.providers[0] == "CUDAExecutionProvider"
        feeds = c.io.sample_inputs(8, seed=2)
        out = c.io.role(ROLE_BRIDGED).name
        np.testing.assert_allclose(c.infer(feeds)[out], o.infer(feeds)[out], atol=1e-4)
