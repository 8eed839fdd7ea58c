"""The fused generation sampler (K steps with guidance, then the inverse head into raw space) as ONNX:
FP32 and FP16 graphs against the PyTorch sampler, with the bounds of the retrieval samplers
(diffgap.export.check: FP32 max abs <= 1e-4; FP16 min row cosine >= 0.999 under onnx.reference's
float16 arithmetic), and against the head-space sampler it wraps: the graph's raw output, projected
by the target head, is the head-space K-step sample (max abs <= 1e-5, float32 rounding)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from diffgap.config import get_preset  # noqa: E402
from diffgap.core.iospec import ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_RAW_SAMPLE  # noqa: E402
from diffgap.core.names import condition_sampler_name  # noqa: E402
from diffgap.export import check as chk  # noqa: E402
from diffgap.export.calibration import sampler_feeds  # noqa: E402
from diffgap.export.fp16 import convert_fp16  # noqa: E402
from diffgap.export.generation import GenerationSampler  # noqa: E402
from diffgap.export.lint import lint_model  # noqa: E402
from diffgap.export.onnx_export import export_module  # noqa: E402
from diffgap.models import DiffGAP  # noqa: E402

EAGER_TOL = 1e-5
STEPS = 6


def randomized_model(seed: int = 0) -> DiffGAP:
    """clap-tiny-gen with every denoiser layer randomised (so every branch matters) and heads kept
    near the identity (invertible, as trained heads start from it)."""
    torch.manual_seed(seed)
    m = DiffGAP(get_preset("clap-tiny-gen")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("heads."):
                p.add_(0.02 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        for mod in m.modalities:
            getattr(m, f"stats_mean_{mod}").normal_(0.0, 0.002)
            getattr(m, f"stats_std_{mod}").uniform_(0.03, 0.06)
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = randomized_model()
    sampler = GenerationSampler(m, "audio_given_text", STEPS)
    io = sampler.io_spec()
    d = tmp_path_factory.mktemp("genexp")
    fp32, fp16 = d / f"{io.name}.onnx", d / f"{io.name}.fp16.onnx"
    export_module(sampler, io, fp32)
    convert_fp16(fp32, fp16, io, kind="denoiser", calibration=sampler_feeds(io, 16, 1))
    return m, sampler, io, fp32, fp16


def test_io_declaration(exported):
    m, sampler, io, _, _ = exported
    assert io.name == condition_sampler_name("text", "audio")
    assert io.role(ROLE_CONDITION).shape == ("batch", m.config.embed_dim)
    assert io.role(ROLE_NOISE).shape == ("batch", m.config.heads.dim)
    assert io.role(ROLE_RAW_SAMPLE).shape == ("batch", m.config.embed_dim)
    assert io.role(ROLE_GUIDANCE).optional
    assert io.meta["steps"] == STEPS and io.meta["output_space"] == "raw"


def test_fp32_graph_equals_the_pytorch_sampler(exported):
    m, sampler, io, fp32, _ = exported
    sess = chk.ort_session(fp32)
    for b in (1, 3, 8):
        feeds = sampler_feeds(io, b, seed=b, guidance=(1.0, 3.0, 0.5))
        (out,) = sess.run(None, feeds)
        with torch.no_grad():
            c, z, g = (torch.from_numpy(feeds[io.role(r).name]) for r in (ROLE_CONDITION, ROLE_NOISE, ROLE_GUIDANCE))
            ref = sampler(c, z, g).numpy()
            head = m.bridge("audio_given_text", c, z, steps=STEPS, guidance_scale=g, mode="noise", eta=0.0)
            projected = m.project("audio", torch.from_numpy(out)).numpy()
        assert out.shape == (b, m.config.embed_dim)
        assert np.abs(out - ref).max() <= EAGER_TOL
        assert np.abs(projected - head.numpy()).max() <= EAGER_TOL     # the raw sample is the head-space sample mapped back
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert lint_model(fp32).ok


def test_fp16_parity_and_the_export_checks(exported):
    m, sampler, io, fp32, fp16 = exported
    p = chk.check_model(sampler, io, fp32, fp16, kind="denoiser", fp16_backend="reference",
                        feeds_fn=lambda b, s: sampler_feeds(io, b, s, guidance=(1.0, 3.0)))
    assert p.fp32_max_abs <= chk.FP32_MAX_ABS, p
    assert p.fp16_min_cos >= chk.FP16_MIN_COS_DENOISER, p
    assert lint_model(fp16).ok


def test_export_cli_adds_the_generation_sampler(tmp_path):
    from diffgap import cli
    from diffgap.checkpoint import save_checkpoint
    from diffgap.core.manifest import Manifest

    ckpt = save_checkpoint(tmp_path / "ck", randomized_model(1))
    out = tmp_path / "export"
    assert cli.main(["export", str(ckpt), "--out", str(out), "--encoders", "none", "--generation", "4"]) == 0
    man = Manifest.load(out)
    entry = man.models[condition_sampler_name("text", "audio")]
    assert entry.io.meta["steps"] == 4 and set(entry.files) == {"fp32", "fp16"}
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "e2"), "--encoders", "none", "--generation", "0"]) == 2
