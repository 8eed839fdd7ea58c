"""The fused sampler graph is exactly the eager sampler: same noise in, same embedding out.

Tolerance: max abs <= 1e-5 on unit-norm outputs (float32 rounding over up to 50 unrolled steps is
~1e-6; a wrong coefficient, timestep or guidance branch is >= 1e-3). Every graph also runs at
B = 1, 3, 8 although traced at B = 2 (dynamic batch), and passes the TensorRT lint (no Loop/If).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from diffgap.core.errors import UserError  # noqa: E402
from diffgap.config import get_preset  # noqa: E402
from diffgap.export.check import denoiser_feeds, ort_session  # noqa: E402
from diffgap.export.fused import FusedSampler, direction_of, export_name  # noqa: E402
from diffgap.export.lint import lint_model  # noqa: E402
from diffgap.export.onnx_export import META_IOSPEC, export_module, read_metadata  # noqa: E402
from diffgap.core.iospec import (  # noqa: E402
    ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_PROJECTED, ROLES, IOSpec,
)
from diffgap.models import DiffGAP  # noqa: E402

EAGER_TOL = 1e-5
DIRECTION = "audio_given_text"


def randomized_model(preset: str = "clap-tiny", seed: int = 0) -> DiffGAP:
    """A clap-tiny DiffGAP whose zero-initialised layers are randomised, so every branch matters."""
    torch.manual_seed(seed)
    m = DiffGAP(get_preset(preset)).eval()
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        for mod in m.modalities:
            getattr(m, f"stats_mean_{mod}").normal_(0.0, 0.01)
            getattr(m, f"stats_std_{mod}").uniform_(0.03, 0.06)
    return m


@pytest.fixture(scope="module")
def model() -> DiffGAP:
    return randomized_model()


def _eager(model, feeds, steps, mode, guidance):
    g = torch.from_numpy(feeds["guidance_scale"]) if guidance else 1.0
    with torch.no_grad():
        return model.bridge(
            DIRECTION, torch.from_numpy(feeds["condition"]), torch.from_numpy(feeds["noise"]),
            steps=steps, guidance_scale=g, mode=mode, eta=0.0,
        ).numpy()


@pytest.mark.parametrize("guidance", [True, False], ids=["guidance", "no-guidance"])
@pytest.mark.parametrize("steps", [1, 10, 25, 50])
def test_fused_graph_equals_eager_sampler(model, tmp_path, steps, guidance):
    mode = model.config.diffusion.bridge_mode
    fused = FusedSampler(model, DIRECTION, steps, guidance=guidance)
    io = fused.io_spec()
    path = tmp_path / f"{io.name}.onnx"
    export_module(fused, io, path)
    sess = ort_session(path)
    for b in (1, 3, 8):
        feeds = denoiser_feeds(io, b, seed=b, guidance=(1.0, 3.0, 0.5))
        out, src = sess.run(None, feeds)
        ref = _eager(model, feeds, steps, mode, guidance)
        with torch.no_grad():
            ref_src = model.project("text", torch.from_numpy(feeds["condition"])).numpy()
        assert np.abs(src - ref_src).max() <= EAGER_TOL
        assert out.shape == (b, model.config.heads.dim)
        assert np.abs(out - ref).max() <= EAGER_TOL, f"K={steps} B={b}"
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    rep = lint_model(path)
    assert rep.ok, rep.format()
    assert not {"Loop", "If", "Scan"} & set(rep.op_counts)


def test_noise_mode_graph_equals_eager(model, tmp_path):
    fused = FusedSampler(model, "text_given_audio", 10, guidance=True, mode="noise")
    io = fused.io_spec()
    export_module(fused, io, tmp_path / "m.onnx")
    feeds = denoiser_feeds(io, 5, seed=1, guidance=(2.0,))
    out = ort_session(tmp_path / "m.onnx").run(None, feeds)[0]
    with torch.no_grad():
        ref = model.bridge("text_given_audio", torch.from_numpy(feeds["condition"]), torch.from_numpy(feeds["noise"]),
                           steps=10, guidance_scale=2.0, mode="noise", eta=0.0).numpy()
    assert np.abs(out - ref).max() <= EAGER_TOL


def test_guidance_changes_output_and_one_equals_conditional(model, tmp_path):
    """The guidance input is live (not folded away) and g = 1 reproduces the no-guidance graph."""
    with_g = FusedSampler(model, DIRECTION, 4, guidance=True)
    no_g = FusedSampler(model, DIRECTION, 4, guidance=False)
    export_module(with_g, with_g.io_spec(), tmp_path / "g.onnx")
    export_module(no_g, no_g.io_spec(), tmp_path / "n.onnx")
    feeds = denoiser_feeds(with_g.io_spec(), 4, seed=0, guidance=(1.0,))
    a1 = ort_session(tmp_path / "g.onnx").run(None, feeds)[0]
    b = ort_session(tmp_path / "n.onnx").run(None, {k: feeds[k] for k in ("condition", "noise")})[0]
    np.testing.assert_allclose(a1, b, atol=EAGER_TOL)
    feeds["guidance_scale"][:] = 4.0
    a4 = ort_session(tmp_path / "g.onnx").run(None, feeds)[0]
    assert np.abs(a4 - a1).max() > 1e-3


def test_io_spec_and_metadata(model, tmp_path):
    fused = FusedSampler(model, DIRECTION, 7, guidance=True, mode="source")
    io = fused.io_spec()
    cfg = model.config
    assert io.name == "diffgap_text_to_audio" == export_name(DIRECTION)
    assert direction_of(io.name) == DIRECTION
    assert io.input_names == ["condition", "noise", "guidance_scale"]
    assert io.input("condition").shape == ("batch", cfg.embed_dim)
    assert io.input("noise").shape == ("batch", cfg.heads.dim)
    assert io.input("guidance_scale").optional and io.input("guidance_scale").default == cfg.diffusion.guidance_scale
    assert io.output_names == ["embedding", "source_embedding"]
    assert io.output("embedding").shape == io.output("source_embedding").shape == ("batch", cfg.heads.dim)
    path = tmp_path / "m.onnx"
    export_module(fused, io, path, metadata={"diffgap.K": "7"})
    m = onnx.load(str(path))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    for vi, spec in zip([*m.graph.input, *m.graph.output], [*io.inputs, *io.outputs]):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert vi.name == spec.name and dims == list(spec.shape)
    meta = read_metadata(m)
    assert meta["diffgap.K"] == "7"
    assert IOSpec.from_dict(json.loads(meta[META_IOSPEC])) == io
    baked = io.meta
    assert baked["steps"] == 7 and baked["bridge_mode"] == "source" and baked["schedule"] == cfg.diffusion.schedule
    assert len(baked["timesteps"].split(",")) == 7


def test_invalid_steps_rejected(model):
    T = model.config.diffusion.num_train_timesteps
    with pytest.raises(UserError, match="steps"):
        FusedSampler(model, DIRECTION, 0)
    with pytest.raises(UserError, match="steps"):
        FusedSampler(model, DIRECTION, T + 1, mode="noise")
    with pytest.raises(UserError, match="t0"):  # source mode starts at t0*T < T
        FusedSampler(model, DIRECTION, T, mode="source")
    with pytest.raises(ValueError, match="direction"):
        FusedSampler(model, "video_given_text", 4)


def test_roles_name_the_declared_tensors(model):
    """Consumers look the sampler's tensors up by role; the roles survive the manifest round trip."""
    io = FusedSampler(model, DIRECTION, 4, guidance=True).io_spec()
    assert io.role(ROLE_CONDITION) == io.inputs[0] and io.role(ROLE_NOISE) == io.inputs[1]
    assert io.role(ROLE_GUIDANCE) == io.inputs[2] and io.role(ROLE_GUIDANCE).optional
    assert io.role(ROLE_BRIDGED) == io.outputs[0] and io.role(ROLE_PROJECTED) == io.outputs[1]
    back = IOSpec.from_dict(json.loads(json.dumps(io.to_dict())))
    assert back.role(ROLE_BRIDGED) == io.role(ROLE_BRIDGED)
    plain = FusedSampler(model, DIRECTION, 4, guidance=False).io_spec()
    assert not plain.has_role(ROLE_GUIDANCE) and plain.has_role(ROLE_CONDITION)
    with pytest.raises(ValueError, match="no tensor plays role 'guidance_scale'"):
        plain.role(ROLE_GUIDANCE)
    old = io.to_dict()
    del old["meta"][ROLES]  # an export written before roles existed
    with pytest.raises(ValueError, match="predates tensor roles.*re-export"):
        IOSpec.from_dict(old).role(ROLE_CONDITION)
    bad = json.loads(json.dumps(io.to_dict()))  # a deep copy: to_dict shares nested meta
    bad["meta"][ROLES][ROLE_NOISE] = "not_a_tensor"
    with pytest.raises(ValueError, match="name no declared tensor"):
        IOSpec.from_dict(bad)
