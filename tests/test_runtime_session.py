"""diffgap.runtime.session: the one inference interface, on real onnxruntime sessions.

The graphs are small real ONNX models with the exported models' exact I/O contract
(tests/runtime_graphs.py); their outputs are checked against numpy references.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import runtime_graphs as rg
from diffgap.core.manifest import Manifest
from diffgap.runtime.session import (
    ONNX_IO_SPEC_KEY,
    OrtSession,
    load,
    open_model,
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return rg.make_export(tmp_path_factory.mktemp("session") / "export")


@pytest.fixture(scope="module")
def sampler(export):
    with open_model(export.root, "diffgap_text_to_audio") as s:
        yield s


def test_metadata_comes_from_the_declaration(sampler):
    io = rg.sampler_io("text", "audio")
    assert [t.name for t in sampler.inputs] == io.input_names
    assert [t.name for t in sampler.outputs] == io.output_names
    assert sampler.max_batch == io.max_batch
    assert sampler.backend == "ort-cpu" and sampler.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_infer_matches_numpy_reference(sampler, batch):
    feeds = sampler.io.sample_inputs(batch, seed=batch)
    out = sampler.infer(feeds)
    ref_emb, ref_src = rg.reference_sampler(feeds["condition"], feeds["noise"], feeds["guidance_scale"])
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (batch, rg.D)
    # float32 matmul + normalisation on 8-16 dims: a few ulps
    np.testing.assert_allclose(out["embedding"], ref_emb, atol=1e-6)
    np.testing.assert_allclose(out["source_embedding"], ref_src, atol=1e-6)


def test_optional_input_takes_its_declared_default(sampler):
    feeds = sampler.io.sample_inputs(2, include_optional=False)
    out = sampler.infer(feeds)
    explicit = sampler.infer({**feeds, "guidance_scale": np.ones((2, 1), np.float32)})
    np.testing.assert_array_equal(out["embedding"], explicit["embedding"])


def test_load_reads_the_declaration_from_onnx_metadata(export):
    with load(export.path("diffgap_audio_to_text")) as s:
        assert s.io == export.model("diffgap_audio_to_text").io
        assert isinstance(s, OrtSession)


def test_fp16_graph_is_close_to_fp32(export):
    with open_model(export.root, "diffgap_text_to_audio", precision="fp16") as s16, \
            open_model(export.root, "diffgap_text_to_audio") as s32:
        feeds = s32.io.sample_inputs(8, seed=3)
        a, b = s32.infer(feeds)["embedding"], s16.infer(feeds)["embedding"]
    assert s16.precision == "fp16"
    # weights rounded to fp16 (ORT CPU computes in fp32 after casts): cosine stays ~1
    assert (a * b).sum(1).min() >= 0.999


# -- bad input: one clear error each ---------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f: {**f, "condition": f["condition"].astype(np.float64)}, r"dtype float64, expected float32"),
        (lambda f: {**f, "condition": f["condition"][:, :5]}, r"has shape \(2, 5\), expected"),
        (lambda f: {**f, "condition": f["condition"][None]}, r"has rank 3"),
        (lambda f: {**f, "noise": f["noise"][:1]}, r"batch 1 but other inputs have 2"),
        (lambda f: {k: v for k, v in f.items() if k != "noise"}, r"missing input 'noise'"),
        (lambda f: {**f, "bogus": f["noise"]}, r"unknown input"),
        (lambda f: {**f, "noise": f["noise"].tolist()}, r"must be a numpy array"),
    ],
)
def test_bad_feeds_are_refused(sampler, mutate, match):
    feeds = sampler.io.sample_inputs(2, include_optional=False)
    with pytest.raises(ValueError, match=match):
        sampler.infer(mutate(feeds))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_is_refused(sampler, bad):
    feeds = sampler.io.sample_inputs(3, include_optional=False)
    feeds["condition"][2, 1] = bad
    with pytest.raises(ValueError, match=r"'condition' contains NaN/Inf \(first at row 2\)"):
        sampler.infer(feeds)


def test_batch_above_profile_max_is_refused(sampler):
    feeds = sampler.io.sample_inputs(sampler.max_batch + 1, include_optional=False)
    with pytest.raises(ValueError, match=r"batch 17 is outside the declared profile \[1, 16\]"):
        sampler.infer(feeds)


def test_missing_file(tmp_path, export):
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        open_model(tmp_path, "diffgap_text_to_audio")
    with pytest.raises(KeyError, match="has no model 'nope'"):
        open_model(export.root, "nope")


def test_truncated_onnx_is_refused(tmp_path):
    src = rg.sampler_model("text", "audio").SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(ValueError, match="is not an ONNX model or is truncated"):
        load(p)
    p.write_bytes(b"this is not a protobuf at all")
    with pytest.raises(ValueError, match="is not an ONNX model or is truncated"):
        load(p)


def test_foreign_onnx_is_refused(tmp_path):
    """A graph whose I/O differs from the declaration it is opened with."""
    p = tmp_path / "text.onnx"
    onnx.save(rg.text_model(), str(p))
    with pytest.raises(ValueError, match=r"graph inputs \['input_ids'\] differ from the declared"):
        load(p, io=rg.sampler_io("text", "audio"))
    m = rg.text_model()
    del m.metadata_props[:]
    onnx.save(m, str(p))
    with pytest.raises(ValueError, match=f"carries no '{ONNX_IO_SPEC_KEY}' metadata"):
        load(p)


def test_export_file_replaced_or_truncated_is_refused(tmp_path, export):
    root = tmp_path / "export"
    shutil.copytree(export.root, root)
    p = root / "diffgap_text_to_audio.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="does not match its sha256 in manifest.json"):
        open_model(root, "diffgap_text_to_audio")
    p.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        open_model(root, "diffgap_text_to_audio")


def test_declared_dtype_mismatch_is_refused(tmp_path, export):
    root = tmp_path / "export"
    shutil.copytree(export.root, root)
    d = json.loads((root / "manifest.json").read_text())
    d["models"]["clap_text_encoder"]["io"]["inputs"][0]["dtype"] = "int32"
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"'input_ids' is tensor\(int64\) in the graph but declared int32"):
        open_model(Manifest.load(root), "clap_text_encoder")


def test_unknown_backend_or_precision(export):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        open_model(export.root, "diffgap_text_to_audio", backend="cuda")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        open_model(export.root, "diffgap_text_to_audio", precision="int8")
    with pytest.raises(ValueError, match="runs built engines"):
        load(export.path("diffgap_text_to_audio"), backend="tensorrt")


def _cuda_ep_works() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    s = ort.InferenceSession(rg.text_model().SerializeToString(), providers=["CUDAExecutionProvider"])
    return "CUDAExecutionProvider" in s.get_providers()


@pytest.mark.skipif(_cuda_ep_works(), reason="the CUDA EP works on this machine; the no-fallback path needs a machine without one")
@pytest.mark.parametrize("backend, ep", [("ort-cuda", "CUDAExecutionProvider"), ("ort-trt", "TensorrtExecutionProvider")])
def test_accelerator_ep_never_falls_back_silently(export, backend, ep):
    """onnxruntime itself drops an EP it cannot initialise and runs on CPU; we refuse instead."""
    with pytest.raises(RuntimeError, match=rf"{ep}"):
        open_model(export.root, "diffgap_text_to_audio", backend=backend)


def test_threads_and_optimisation_options(export):
    with open_model(export.root, "diffgap_text_to_audio", intra_op_threads=1, graph_optimization="basic") as s:
        feeds = s.io.sample_inputs(2)
        ref, _ = rg.reference_sampler(feeds["condition"], feeds["noise"], feeds["guidance_scale"])
        np.testing.assert_allclose(s.infer(feeds)["embedding"], ref, atol=1e-6)
    with pytest.raises(ValueError, match="graph_optimization must be one of"):
        open_model(export.root, "diffgap_text_to_audio", graph_optimization="max")
