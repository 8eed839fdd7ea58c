"""onnxruntime's TensorRT provider options (``ort-trt``) and onnxruntime load errors, on CPU.

The options are checked against the IOSpec and the provider's documented option names; the GPU half
(a real TensorRT-provider session) is in tests/test_runtime_gpu.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import runtime_graphs as rg
from diffgap.runtime.ort_trt import ort_trt_cache_folder, ort_trt_options, ort_trt_profile_shapes, triton_accelerator_parameters
from diffgap.runtime.session import load, ort_provider_options, ort_providers

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return rg.make_export(tmp_path_factory.mktemp("ort_trt") / "export")


def test_profile_shapes_are_the_iospec_batch_range(export):
    for name, entry in export.models.items():
        io = entry.io
        got = ort_trt_profile_shapes(io)
        assert sorted(got) == ["trt_profile_max_shapes", "trt_profile_min_shapes", "trt_profile_opt_shapes"]
        for kind, batch in (("min", io.min_batch), ("opt", io.opt_batch), ("max", io.max_batch)):
            # "name:BxD1x...,name2:..." with every input once, batch first, feature dims as declared
            items = dict(part.split(":") for part in got[f"trt_profile_{kind}_shapes"].split(","))
            assert list(items) == io.input_names, name
            for t in io.inputs:
                dims = [int(d) for d in items[t.name].split("x")]
                assert dims == [batch, *t.feature_shape], (name, kind, t.name)


def test_ort_trt_keeps_the_graph_types_and_caches_engines(export, tmp_path):
    io = export.model("diffgap_text_to_audio").io
    opts = ort_trt_options(io, tmp_path / "cache")
    assert opts["trt_fp16_enable"] is False and opts["trt_int8_enable"] is False
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_timing_cache_enable"] is True


def test_open_model_provider_options(export, tmp_path):
    io = export.model("diffgap_text_to_audio").io
    cache = tmp_path / "c"
    opts = ort_provider_options("ort-trt", io, cache)
    assert cache.is_dir(), "the provider's cache folder is created before the session"
    assert opts == ort_trt_options(io, cache)
    # the caller's options win over the defaults (an explicit choice, never a silent one)
    assert ort_provider_options("ort-trt", io, cache, given={"trt_fp16_enable": True})["trt_fp16_enable"] is True
    assert ort_provider_options("ort-cuda", io, cache) == {}
    assert ort_provider_options("ort-cpu", io, cache) == {}


def test_device_reaches_every_gpu_provider():
    """``ort-trt`` lists TensorRT, then CUDA for the nodes TensorRT does not take: both get device_id,
    so the fallback runs on the same GPU (onnxruntime's default device_id is 0)."""
    trt = ort_providers("ort-trt", {"trt_fp16_enable": False}, device=2)
    assert trt == [("TensorrtExecutionProvider", {"trt_fp16_enable": False, "device_id": 2}),
                   ("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    assert ort_providers("ort-cuda", device=1) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    # a device_id given among the accelerator's options is the device of every GPU provider too
    assert ort_providers("ort-trt", {"device_id": 3})[1] == ("CUDAExecutionProvider", {"device_id": 3})
    assert ort_providers("ort-trt") == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("ort-cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="'ort-cpu' has none"):
        ort_providers("ort-cpu", device=0)


def test_ort_trt_cache_folder_is_one_level_below_an_existing_folder(tmp_path):
    """onnxruntime creates its cache folder with one create_directory call: the parent must exist."""
    for parent in ("/tmp", "/tmp/", str(tmp_path)):
        folder = ort_trt_cache_folder(parent, "diffgap_text_to_audio")
        assert Path(folder).parent == Path(parent) and Path(folder).name == "diffgap_ort_trt_diffgap_text_to_audio"
    os.mkdir(ort_trt_cache_folder(tmp_path, "m"))  # one mkdir (no parents) is enough: what the provider does


def test_triton_parameters_spell_the_same_options(export):
    io = export.model("diffgap_text_to_audio").io
    opts, params = ort_trt_options(io, "/c"), triton_accelerator_parameters(io, "/c")
    assert params.pop("precision_mode") == "FP32" and not opts.pop("trt_fp16_enable") and not opts.pop("trt_int8_enable")
    assert params == {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in opts.items()}


# -- onnxruntime load errors say what is wrong --------------------------------------------------
def _model(op: str, domain: str = ""):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_not_onnx_or_truncated(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"plain text, not a protobuf")
    with pytest.raises(ValueError, match=r"is not an ONNX model or is truncated \(onnxruntime: .*Protobuf parsing failed"):
        load(p)


def test_invalid_graph(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(_model("NoSuchOp").SerializeToString())  # unknown op of the default domain
    with pytest.raises(ValueError, match=r"an ONNX file whose graph onnxruntime rejects \(onnxruntime: .*INVALID_GRAPH"):
        load(p)


def test_other_onnxruntime_errors_keep_their_message(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(_model("Relu", "com.example.unregistered").SerializeToString())  # a valid ONNX file
    with pytest.raises(RuntimeError, match=r"could not create a 'ort-cpu' session .*\(Fail: .*not a registered function/op") as e:
        load(p)
    assert "not an ONNX model" not in str(e.value)
