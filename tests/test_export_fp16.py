"""FP16 conversion of the fused samplers (diffgap.export.fp16): AutoCast in linear time, same result.

A K = 25 clap-tiny sampler (the shape that made stock AutoCast quadratic) is converted once per
module. Checks: strongly typed graph with FP32 I/O, full checker + strict shape inference, TensorRT
lint, no dead nodes or redundant Casts, weights stored once, FP16 vs PyTorch FP32 row cosine >= 0.999
with real float16 arithmetic (onnx.reference); that the linear-time AutoCast makes the same
per-node precision decisions as stock AutoCast on that sampler and on a tiny CLAP text encoder; and
that only the internals the patch module lists change, all restored afterwards.
"""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.onnx.autocast")

from diffgap.export import check as chk  # noqa: E402
from diffgap.export import fp16  # noqa: E402
from diffgap.export import modelopt_autocast_patch as patch  # noqa: E402
from diffgap.export.calibration import sampler_feeds  # noqa: E402
from diffgap.export.fused import FusedSampler  # noqa: E402
from diffgap.export.lint import lint_model  # noqa: E402
from diffgap.export.onnx_export import check_and_infer, export_module  # noqa: E402

from test_export_fused import randomized_model  # noqa: E402

DIRECTION = "audio_given_text"
K = 25


@pytest.fixture(scope="module")
def model():
    return randomized_model()


@pytest.fixture(scope="module")
def sampler(model, tmp_path_factory):
    fs = FusedSampler(model, DIRECTION, K, guidance=True)
    io = fs.io_spec()
    d = tmp_path_factory.mktemp("fp16")
    f32, f16 = d / "s.onnx", d / "s.fp16.onnx"
    export_module(fs, io, f32)
    m16 = fp16.convert_fp16(f32, f16, io, kind="denoiser", calibration=sampler_feeds(io, 8, 1))
    return fs, io, f32, f16, m16


def _elem_types(m: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def test_strongly_typed_fp32_io_and_lint(sampler):
    _, io, _, f16, _ = sampler
    m16 = onnx.load(str(f16))
    for vi, spec in zip([*m16.graph.input, *m16.graph.output], [*io.inputs, *io.outputs]):
        assert vi.name == spec.name
        assert onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) == spec.np_dtype
    check_and_infer(m16)  # full checker + strict shape inference with type checks
    assert lint_model(m16).ok
    types = _elem_types(m16)
    gemms = [n for n in m16.graph.node if n.op_type in ("Gemm", "MatMul")]
    # AutoCast's range rule may keep a few Gemms whose reference activations are large in FP32
    half = sum(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in gemms)
    assert gemms and half >= 0.8 * len(gemms)
    for n in m16.graph.node:
        if n.op_type in fp16.FP32_OP_TYPES:
            assert types[n.output[0]] == onnx.TensorProto.FLOAT, n.name


def test_no_dangling_or_redundant_casts(sampler):
    m16 = onnx.load(str(sampler[3]))
    read = {t for n in m16.graph.node for t in n.input} | {o.name for o in m16.graph.output}
    assert all(any(o in read for o in n.output) for n in m16.graph.node)
    types = _elem_types(m16)
    consumers = Counter(t for n in m16.graph.node for t in n.input)
    by_output = {o: n for n in m16.graph.node for o in n.output}
    for n in m16.graph.node:
        if n.op_type != "Cast":
            continue
        to = onnx.helper.get_attribute_value(n.attribute[0])
        assert types[n.input[0]] != to, f"same-type Cast {n.name}"
        prev = by_output.get(n.input[0])
        if prev is not None and prev.op_type == "Cast" and consumers[prev.output[0]] == 1:
            # a widening Cast straight back to its source type would be a no-op round trip
            assert types[prev.input[0]] != to, f"Cast round trip {prev.name} -> {n.name}"
    fp16._check_casts(m16, "sampler")


def test_shared_weights_stored_once(sampler):
    """The K unrolled steps share one set of denoiser weights; the FP16 graph must not copy them per step."""
    _, _, f32, _, m16 = sampler
    m32 = onnx.load(str(f32))
    digests = Counter(
        hashlib.sha1(onnx.numpy_helper.to_array(i).tobytes()).hexdigest() + str(i.data_type)
        for i in m16.graph.initializer if int(np.prod(i.dims)) > 16
    )
    assert max(digests.values()) == 1
    big32 = sum(1 for i in m32.graph.initializer if int(np.prod(i.dims)) > 16)
    assert len(digests) <= 2 * big32  # at most one copy per precision


def test_fp16_matches_pytorch_with_real_fp16_arithmetic(sampler):
    fs, io, f32, f16, _ = sampler
    p = chk.check_model(fs, io, f32, f16, kind="denoiser", batches=(1, 3))
    assert p.fp16_measure == chk.MEASURE_FP16_REF
    assert p.fp32_max_abs <= chk.FP32_MAX_ABS
    assert p.fp16_min_cos >= chk.FP16_MIN_COS_DENOISER
    assert p.ok


def _signature(m: onnx.ModelProto) -> Counter:
    """Nodes with the element type of each input and output: the per-node precision decisions."""
    types = _elem_types(m)
    return Counter(
        (n.op_type, n.name, tuple(types.get(x) for x in n.input if x), tuple(types.get(x) for x in n.output))
        for n in m.graph.node
    )


def test_same_decisions_as_stock_autocast(model, tmp_path):
    """Linear-time AutoCast vs stock AutoCast on a small sampler: same nodes, same precisions, same outputs."""
    fs = FusedSampler(model, DIRECTION, 3, guidance=True)
    io = fs.io_spec()
    export_module(fs, io, tmp_path / "s.onnx")
    calib = sampler_feeds(io, 8, 1)
    fast = fp16.convert_fp16(tmp_path / "s.onnx", tmp_path / "fast.onnx", io, kind="denoiser", calibration=calib)
    stock = fp16.convert_fp16(tmp_path / "s.onnx", tmp_path / "stock.onnx", io, kind="denoiser", calibration=calib,
                              linear_time=False)
    assert _signature(fast) == _signature(stock)
    assert len(fast.graph.initializer) < len(stock.graph.initializer)  # stock copies each shared weight per use
    feeds = chk.denoiser_feeds(io, 3, seed=5)
    with np.errstate(all="ignore"):
        a = chk.reference_session(tmp_path / "fast.onnx").run(None, feeds)
        b = chk.reference_session(tmp_path / "stock.onnx").run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _owner_attrs() -> dict[tuple[str, str], object]:
    """Every attribute of every owner the patch touches (module and class namespaces)."""
    owners = {id(o): o for o, _ in patch.patched_attributes()}.values()
    return {(getattr(o, "__name__", repr(o)), k): v for o in owners for k, v in vars(o).items()}


def test_autocast_internals_restored():
    """Inside the block only attributes the patch module lists change; on exit (here by an error
    raised mid-block) every attribute of those owners is the stock one again."""
    listed = {(getattr(o, "__name__", repr(o)), a) for o, a in patch.patched_attributes()}
    assert len(listed) == len(patch.patched_attributes())  # no duplicates
    before = _owner_attrs()
    with pytest.raises(ValueError, match="boom"):
        with patch.linear_time_autocast():
            inside = _owner_attrs()
            changed = {k for k in before if inside.get(k) is not before[k]}
            assert changed and changed <= listed, changed - listed
            raise ValueError("boom")
    after = _owner_attrs()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def _text_encoder_graph(tmp_path):
    from diffgap.encoders.clap import ClapEncoder
    from diffgap.export.calibration import captions

    enc = ClapEncoder.from_arch("tiny")
    io = enc.text_module.io_spec()
    export_module(enc.text_module, io, tmp_path / "text.onnx")
    return enc, io, {n: enc.tokenize(captions(8, 0))[n] for n in io.input_names}


def test_same_decisions_as_stock_autocast_on_an_encoder(tmp_path):
    """The encoder graphs are converted under the same patch: a (tiny) CLAP text encoder converted by
    the linear-time and by stock AutoCast has the same nodes, precisions and outputs, and every
    ModelOpt internal is stock again after a real conversion (the pass-local swaps included)."""
    enc, io, calib = _text_encoder_graph(tmp_path)
    before = _owner_attrs()
    fast = fp16.convert_fp16(tmp_path / "text.onnx", tmp_path / "fast.onnx", io, kind="text_encoder", calibration=calib)
    after = _owner_attrs()
    assert all(after[k] is before[k] for k in before)
    stock = fp16.convert_fp16(tmp_path / "text.onnx", tmp_path / "stock.onnx", io, kind="text_encoder",
                              calibration=calib, linear_time=False)
    assert _signature(fast) == _signature(stock)
    assert any(n.op_type == "Cast" for n in fast.graph.node)  # a mixed-precision graph, not a no-op
    feeds = {n: v[:3] for n, v in enc.tokenize(["a dog barks", "rain on a roof", "an engine idles"]).items()
             if n in io.input_names}
    with np.errstate(all="ignore"):
        a = chk.reference_session(tmp_path / "fast.onnx").run(None, feeds)
        b = chk.reference_session(tmp_path / "stock.onnx").run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_other_modelopt_version_refused(monkeypatch):
    """The replacements copy nvidia-modelopt 0.47.0's code: any other version is refused, naming the fix."""
    from importlib import metadata

    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    stock = PrecisionConverter._add_cast
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.48.0" if name == "nvidia-modelopt" else real_version(name))
    with pytest.raises(ImportError, match=r"0\.47\.0 internals but 0\.48\.0 is installed.*pip install"):
        with patch.linear_time_autocast():
            pass
    assert PrecisionConverter._add_cast is stock
