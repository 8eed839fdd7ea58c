"""diffgap.runtime.engine: the pure-python half of the engine builder (versions, cache keys, sidecars,
finding and planning engines). The TensorRT half runs in tests/test_runtime_gpu.py on a GPU host."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

import runtime_graphs as rg
from diffgap.core.manifest import Manifest
from diffgap.runtime.engine import (
    ENGINE_FORMAT,
    BuildSettings,
    EngineMeta,
    HostInfo,
    cache_key,
    check_trt_version,
    engine_path,
    find_engine,
    key_digest,
    key_mismatch,
    needs_strongly_typed_flag,
    onnx_sha256,
    parse_version,
    plan_builds,
)

H100 = HostInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
A100 = HostInfo("10.13.0.35", "NVIDIA A100-SXM4-40GB", "8.0")
H100_TRT11 = HostInfo("11.0.0.1", "NVIDIA H100 80GB HBM3", "9.0")
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return rg.make_export(tmp_path_factory.mktemp("engine") / "export")


def _fake_engine(man: Manifest, host: HostInfo, model: str, precision: str = "fp16",
                 settings: BuildSettings = BuildSettings(), payload: bytes = b"serialized-plan-bytes") -> None:
    """Write the files build_engine writes (plan + sidecar); the plan bytes are opaque here."""
    import hashlib

    plan = engine_path(man.root / "engines", host, model, precision)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(payload)
    io = man.model(model).io
    EngineMeta(model=model, precision=precision, onnx_file=man.model(model).file(precision),
               key=cache_key(onnx_sha256(man, model, precision), host, io, precision, settings), io=io,
               engine_sha256=hashlib.sha256(payload).hexdigest(), engine_bytes=len(payload)).write(plan)


@pytest.fixture()
def fresh(tmp_path, export):
    root = tmp_path / "export"
    shutil.copytree(export.root, root)
    return Manifest.load(root)


# -- versions -------------------------------------------------------------------------------
def test_parse_version():
    assert parse_version("10.13.0.35") == (10, 13, 0, 35)
    assert parse_version("11.0.0rc1") == (11, 0, 0)
    with pytest.raises(ValueError):
        parse_version("abc")


def test_version_gate_and_strong_typing_flag():
    with pytest.raises(RuntimeError, match=r"TensorRT 10.11.0 is too old.*>= 10.12"):
        check_trt_version("10.11.0")
    with pytest.raises(RuntimeError, match="too old"):
        check_trt_version("8.6.1")
    assert needs_strongly_typed_flag("10.12.0.36") is True    # opt-in on 10.x
    assert needs_strongly_typed_flag("10.13.3") is True
    assert needs_strongly_typed_flag("11.0.0") is False       # always strongly typed on 11
    assert needs_strongly_typed_flag("11.4.1") is False


# -- host identity and keys -----------------------------------------------------------------
def test_host_slug_is_a_safe_folder_name():
    assert H100.slug == "nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35"
    assert A100.slug != H100.slug and H100_TRT11.slug != H100.slug
    assert "/" not in HostInfo("1", "A/B C", "8.6").slug


def test_cache_key_covers_onnx_trt_gpu_cc_and_settings(export):
    io = export.model("diffgap_text_to_audio").io
    base = cache_key("aa", H100, io, "fp16", BuildSettings())
    assert key_digest(base) == key_digest(dict(base))
    variants = [
        cache_key("bb", H100, io, "fp16", BuildSettings()),
        cache_key("aa", A100, io, "fp16", BuildSettings()),
        cache_key("aa", H100_TRT11, io, "fp16", BuildSettings()),
        cache_key("aa", HostInfo(H100.trt_version, H100.gpu_name, "9.1"), io, "fp16", BuildSettings()),
        cache_key("aa", H100, io, "fp32", BuildSettings()),
        cache_key("aa", H100, io.with_batch(1, 4, 32), "fp16", BuildSettings()),
        cache_key("aa", H100, io, "fp16", BuildSettings(opt_level=5)),
    ]
    digests = {key_digest(v) for v in variants} | {key_digest(base)}
    assert len(digests) == len(variants) + 1
    assert key_mismatch(base, variants[1]) == [
        "compute_capability: '9.0' -> '8.0'", "gpu_name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA A100-SXM4-40GB'"]


def test_build_settings_validation():
    with pytest.raises(ValueError, match="optimisation level must be in 0..5"):
        BuildSettings(opt_level=7)
    with pytest.raises(ValueError, match="workspace"):
        BuildSettings(workspace_mib=0)


# -- sidecar --------------------------------------------------------------------------------
def test_sidecar_round_trip_and_file_checks(fresh):
    _fake_engine(fresh, H100, "diffgap_text_to_audio")
    plan = engine_path(fresh.root / "engines", H100, "diffgap_text_to_audio", "fp16")
    meta = EngineMeta.read(plan)
    assert meta.host == H100 and meta.io == fresh.model("diffgap_text_to_audio").io
    assert json.loads(EngineMeta.sidecar(plan).read_text())["format"] == ENGINE_FORMAT
    meta.check_file(plan)
    meta.check_host(H100, plan)
    with pytest.raises(ValueError, match=r"built for NVIDIA H100 80GB HBM3 \(sm 9.0\), TensorRT 10.13.0.35 but this host is NVIDIA A100"):
        meta.check_host(A100, plan)
    plan.write_bytes(plan.read_bytes()[:-3])  # truncated
    with pytest.raises(ValueError, match="does not match the sha256"):
        meta.check_file(plan)
    EngineMeta.sidecar(plan).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineMeta.read(plan)
    EngineMeta.sidecar(plan).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="has format 'something-else'"):
        EngineMeta.read(plan)


# -- finding an engine ----------------------------------------------------------------------
def test_find_engine(fresh):
    with pytest.raises(FileNotFoundError, match=r"no fp16 TensorRT engine for 'diffgap_text_to_audio' built on NVIDIA H100.*run `diffgap build-engines"):
        find_engine(fresh, "diffgap_text_to_audio", host=H100)
    _fake_engine(fresh, A100, "diffgap_text_to_audio")
    with pytest.raises(FileNotFoundError, match=r"engines exist for: NVIDIA A100-SXM4-40GB \(sm 8.0\)"):
        find_engine(fresh, "diffgap_text_to_audio", host=H100)
    _fake_engine(fresh, H100, "diffgap_text_to_audio")
    assert find_engine(fresh, "diffgap_text_to_audio", host=H100).name == "diffgap_text_to_audio.fp16.plan"
    # the export changes afterwards: the engine is stale
    d = json.loads((fresh.root / "manifest.json").read_text())
    d["files"]["diffgap_text_to_audio.fp16.onnx"]["sha256"] = "f" * 64
    (fresh.root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="built from another version of diffgap_text_to_audio.fp16.onnx"):
        find_engine(Manifest.load(fresh.root), "diffgap_text_to_audio", host=H100)


# -- planning builds: reuse / build / rebuild / refuse --------------------------------------
def _actions(decisions):
    return {(d.model, d.precision): d.action for d in decisions}


def test_plan_builds(fresh):
    models = ["diffgap_text_to_audio", "diffgap_audio_to_text"]
    assert set(_actions(plan_builds(fresh, H100, models)).values()) == {"build"}
    _fake_engine(fresh, H100, "diffgap_text_to_audio")
    _fake_engine(fresh, H100, "diffgap_audio_to_text", settings=BuildSettings(opt_level=5))
    acts = _actions(plan_builds(fresh, H100, models))
    assert acts == {("diffgap_text_to_audio", "fp16"): "reuse", ("diffgap_audio_to_text", "fp16"): "rebuild"}
    refused = [d for d in plan_builds(fresh, H100, models, rebuild=False) if d.action == "refuse"]
    assert [d.model for d in refused] == ["diffgap_audio_to_text"] and "opt_level: 5 -> 3" in refused[0].reason
    assert set(_actions(plan_builds(fresh, H100, models, force=True)).values()) == {"rebuild"}
    # another host gets its own folder: nothing to reuse there
    assert set(_actions(plan_builds(fresh, A100, models)).values()) == {"build"}
    # the default builds every model of the manifest at fp16; fp32 on request
    assert len(plan_builds(fresh, H100)) == len(fresh.models)
    assert {d.precision for d in plan_builds(fresh, H100, models, precisions=("fp16", "fp32"))} == {"fp16", "fp32"}


def test_plan_builds_rebuilds_a_truncated_engine(fresh):
    _fake_engine(fresh, H100, "diffgap_text_to_audio")
    plan = engine_path(fresh.root / "engines", H100, "diffgap_text_to_audio", "fp16")
    plan.write_bytes(b"xx")
    (d,) = plan_builds(fresh, H100, ["diffgap_text_to_audio"])
    assert d.action == "rebuild" and "sha256" in d.reason


# -- no TensorRT here: clear errors ---------------------------------------------------------
@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed; this checks the message on machines without it")
def test_tensorrt_backend_without_tensorrt_is_a_clear_error(fresh):
    from diffgap.runtime.session import load, open_model

    _fake_engine(fresh, H100, "diffgap_text_to_audio")
    plan = engine_path(fresh.root / "engines", H100, "diffgap_text_to_audio", "fp16")
    with pytest.raises(ImportError, match=r"needs the tensorrt package.*pip install -e .\[gpu\]"):
        load(plan)
    with pytest.raises(ImportError, match="needs the tensorrt package"):
        open_model(fresh.root, "diffgap_text_to_audio", backend="tensorrt", precision="fp16")


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_build_engines_cli_without_tensorrt(fresh, capsys):
    from diffgap.cli import main

    assert main(["build-engines", str(fresh.root)]) == 2
    assert "needs the tensorrt package" in capsys.readouterr().err


# -- the serving release's TensorRT ---------------------------------------------------------
def test_sidecar_records_the_tensorrt_version(fresh):
    _fake_engine(fresh, H100, "diffgap_text_to_audio")
    plan = engine_path(fresh.root / "engines", H100, "diffgap_text_to_audio", "fp16")
    d = json.loads(EngineMeta.sidecar(plan).read_text())
    assert d["trt_version"] == "10.13.0.35" == EngineMeta.read(plan).trt_version


def test_server_trt_version_check():
    from diffgap.core.errors import UserError
    from diffgap.runtime.engine import check_server_trt, trt_release

    # what `dpkg -l | grep nvinfer` prints in a tritonserver image, and python's tensorrt.__version__
    assert trt_release("10.8.0.43-1+cuda12.8") == (10, 8, 0) == trt_release("10.8.0.43") == trt_release("10.8")
    check_server_trt("10.8.0.43", "10.8.0.43-1+cuda12.8", "engine x")     # same release: fine
    with pytest.raises(UserError, match=r"built with TensorRT 10.13.0.35 but the server runs TensorRT 10.8.0.*"
                                        r"build the engines inside that release's container.*onnxruntime_onnx"):
        check_server_trt("10.13.0.35", "10.8.0", "engine x")
    with pytest.raises(UserError, match="TensorRT 10.8.1"):                 # patch releases differ too
        check_server_trt("10.8.0.43", "10.8.1", "engine x")
    with pytest.raises(UserError, match=r"pass --server-trt-version.*dpkg -l \| grep nvinfer.*onnxruntime_onnx"):
        check_server_trt("10.8.0.43", None, "engine x")
    with pytest.raises(UserError, match="not a version"):
        check_server_trt("10.8.0.43", "latest", "engine x")


# -- devices ----------------------------------------------------------------------------------
def test_device_index_is_checked_before_any_gpu_work(fresh):
    from diffgap.runtime.engine import build_engines, check_device_index

    assert check_device_index(3) == 3
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="CUDA device index >= 0"):
            check_device_index(bad)
    with pytest.raises(ValueError, match="CUDA device index"):
        build_engines(fresh, device=-1)
    with pytest.raises(ValueError, match="CUDA device index"):
        find_engine(fresh, "diffgap_text_to_audio", device=-2)


# -- CUDA graphs through cuda-python (error handling needs no GPU) ----------------------------
def test_cuda_python_result_tuples_are_checked():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (pip install cuda-python)")
    from diffgap.runtime.cuda_graphs import check, error_name, import_cudart

    assert import_cudart() is cudart
    E = cudart.cudaError_t
    assert check((E.cudaSuccess,), "noop") is None
    assert check((E.cudaSuccess, 7), "one") == 7
    assert check((E.cudaSuccess, 1, 2), "two") == (1, 2)
    assert error_name(cudart, E.cudaErrorStreamCaptureInvalidated) == "cudaErrorStreamCaptureInvalidated"
    with pytest.raises(RuntimeError, match=r"cudaGraphLaunch failed: cudaErrorInvalidValue \(1\)"):
        check((E.cudaErrorInvalidValue,), "cudaGraphLaunch")
    with pytest.raises(TypeError, match="not cudaError_t"):
        check((0, 1), "cudaGraphInstantiate")
    with pytest.raises(TypeError, match="result tuple"):
        check(None, "cudaStreamEndCapture")


def test_cuda_graph_capture_without_a_device_fails_at_begin_capture():
    """A real cuda-python call: without a CUDA driver, cudaStreamBeginCapture returns an error code,
    which is raised naming the call, and the enqueue is never run."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (pip install cuda-python)")
    from diffgap.runtime.cuda_graphs import CudaGraph, unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("a CUDA device is visible: tests/test_runtime_gpu.py captures real graphs")
    assert "no usable CUDA device" in unavailable_reason()
    ran = []
    with pytest.raises(RuntimeError, match=r"cudaStreamBeginCapture failed: cudaError\w+"):
        CudaGraph.capture(0, lambda: ran.append(1) or True)
    assert ran == []
    assert cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # the mode capture uses


# -- CUDA graphs: one execution context per captured batch size (stand-ins for TensorRT) ----------------
def test_each_batch_size_gets_its_own_context_with_fixed_shapes_and_shared_memory():
    """A graph captured from a context is tied to that context's shapes: replaying batch 4's graph after
    batch 1 and the max ran must find batch 4's context untouched. Sizes alternate as a server's do."""
    from diffgap.runtime.trt_session import ContextPerBatch

    io = rg.sampler_io("text", "audio", max_batch=16)
    engine = rg.FakeEngine(io, device_memory_size_v2=3 << 20)
    addresses = {name: 0x1000 * (i + 1) for i, name in enumerate(io.input_names + io.output_names)}
    pool = ContextPerBatch(rg.FakeTrt, engine, io, addresses, stream=77, alloc=engine.alloc)
    used = [pool.get(b) for b in (4, 1, 4, io.max_batch, 4)]
    assert used[0] is used[2] is used[4], "a batch size keeps its context"
    assert len({id(c) for c in used}) == 3 and sorted(pool.contexts) == [1, 4, io.max_batch]
    (memory,) = engine.allocations  # one activation block for every context
    assert memory.nbytes == engine.device_memory_size_v2
    for batch, ctx in pool.contexts.items():
        assert ctx.strategy == "USER_MANAGED" and ctx.memory == (memory.address, engine.device_memory_size_v2)
        assert ctx.profile_calls == [(0, 77)] and ctx.addresses == addresses
        # each input's shape set exactly once, at this context's batch, and never changed afterwards
        assert ctx.shape_calls == [(t.name, t.concrete(batch)) for t in io.inputs]
    with pytest.raises(ValueError, match="outside the engine's profile"):
        pool.get(io.max_batch + 1)
    pool.close()
    assert memory.freed == 1 and not pool.contexts
