"""Our exported FP16 graphs through TensorRT (strongly typed, no BuilderFlag.FP16) on a real GPU.

``@pytest.mark.gpu``: tests/conftest.py skips these with a reason where TensorRT, pycuda or a CUDA
device is missing. On a GPU host they export the tiny presets with :func:`export_all`, build FP16
and FP32 engines with ``diffgap.runtime.engine.build_engines`` and compare every model against
PyTorch FP32 with the export's parity bounds -- here the FP16 figure measures real FP16 tensor-core
arithmetic for the encoders too (what ORT CPU cannot show), and the audio encoder's bicubic
``Resize`` (a lint warning) is proven parseable.
"""
from __future__ import annotations

import numpy as np
import pytest

from diffgap.core.iospec import ROLE_GUIDANCE

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("onnx", reason="the export needs onnx (`pip install -e .[export]`)")
pytest.importorskip("modelopt", reason="the FP16 export needs nvidia-modelopt (`pip install -e .[export]`)")


@pytest.fixture(scope="module")
def gpu_export(tmp_path_factory):
    from diffgap.checkpoint import save_checkpoint
    from diffgap.export import export_all
    from diffgap.runtime.engine import build_engines

    from test_export_fused import randomized_model

    tmp = tmp_path_factory.mktemp("export_gpu")
    save_checkpoint(tmp / "ckpt", randomized_model(), meta={"step": 0})
    res = export_all(tmp / "ckpt", tmp / "export", steps=10, encoders="tiny")
    engines = tmp / "engines"
    decisions = build_engines(res.manifest, precisions=("fp16", "fp32"), engine_dir=engines)
    return res, {(d.model, d.precision): d.plan for d in decisions}


def _module(res, name):
    from diffgap.checkpoint import load_checkpoint
    from diffgap.encoders.clap import ClapEncoder
    from diffgap.export.fused import FusedSampler, direction_of

    if name.startswith("clap_"):
        enc = ClapEncoder.from_arch("tiny", seed=0)
        return enc.text_module if name == "clap_text_encoder" else enc.audio_module
    model, _ = load_checkpoint(res.manifest.extra["checkpoint"]["path"])
    meta = res.manifest.model(name).meta
    return FusedSampler(model, direction_of(name), meta["steps"], guidance=res.manifest.model(name).io.has_role(ROLE_GUIDANCE),
                        mode=meta["bridge_mode"])


@pytest.mark.parametrize("name", ["diffgap_text_to_audio", "diffgap_audio_to_text", "clap_text_encoder", "clap_audio_encoder"])
def test_tensorrt_fp16_and_fp32_parity(gpu_export, name):
    from diffgap.export import check as chk
    from diffgap.encoders.clap import CLIP_SAMPLES, SAMPLE_RATE
    from diffgap.export import calibration
    from diffgap.runtime.trt_session import TrtSession

    res, plans = gpu_export
    io = res.manifest.model(name).io
    module = _module(res, name)
    denoiser = name.startswith("diffgap_")
    for b in (1, 3, 8):
        if denoiser:
            feeds = chk.denoiser_feeds(io, b, seed=b)
        elif name == "clap_audio_encoder":
            feeds = calibration.single_input(io, calibration.clips(b, CLIP_SAMPLES, SAMPLE_RATE, b, int16=True))
        else:
            feeds = io.sample_inputs(b, seed=b)
        refs = chk.torch_forward(module, io, feeds)
        with TrtSession(plans[(name, "fp32")], io, "fp32") as s32, TrtSession(plans[(name, "fp16")], io, "fp16") as s16:
            o32, o16 = s32.infer(feeds), s16.infer(feeds)
        bound16 = chk.FP16_MIN_COS_DENOISER if denoiser else chk.FP16_MIN_COS_ENCODER
        for out_name, ref in zip(io.output_names, refs):
            # TensorRT builds FP32 engines with TF32 tensor-core math by default (BuilderFlag.TF32,
            # ~1e-3 relative), hence 1e-3 here rather than ORT CPU's 1e-4.
            assert np.abs(o32[out_name] - ref).max() <= 1e-3, (name, out_name, b)
            assert np.isfinite(o16[out_name]).all()
            assert chk.row_cosine(o16[out_name].astype(np.float32), ref).min() >= bound16, (name, out_name, b)
