"""diffgap.export.calibration: the FP16 calibration inputs look like what users send, not clipped N(0, 1)."""
from __future__ import annotations

import numpy as np
import pytest

from diffgap.core import audio as A
from diffgap.core.iospec import ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLES, IOSpec, TensorSpec
from diffgap.export import calibration as cal


def test_clips_have_stated_loudness_and_no_clipping():
    x = cal.clips(cal.CALIBRATION_BATCH, A.CLIP_SAMPLES, A.SAMPLE_RATE, seed=0)
    assert x.shape == (8, A.CLIP_SAMPLES) and x.dtype == np.float32
    rms_db = 20 * np.log10(np.sqrt((x.astype(np.float64) ** 2).mean(1)))
    for i, kind in enumerate(cal._CLIP_KINDS):
        want = -70.0 if kind == "silence" else cal.LOUDNESS_DBFS[i]
        assert abs(rms_db[i] - want) < 0.5, (kind, rms_db[i], want)
    assert np.abs(x).max() < 1.0  # nothing pinned at full scale (the clipped-noise failure mode)
    # distinct spectra: no two rows alike
    assert min(np.abs(x[i] - x[j]).max() for i in range(8) for j in range(i)) > 1e-3


def test_int16_round_trip_matches_laion_clap_path():
    """``int16=True`` clips == laion-clap's own ``int16_to_float32(float32_to_int16(x))`` of the float clips."""
    pytest.importorskip("torch")  # laion-clap's data helpers are torch-side
    from laion_clap.training import data as laion_data

    x = cal.clips(3, 48000, A.SAMPLE_RATE, seed=2)
    q = cal.clips(3, 48000, A.SAMPLE_RATE, seed=2, int16=True)
    ref = np.stack([laion_data.int16_to_float32(laion_data.float32_to_int16(row)) for row in x])
    np.testing.assert_array_equal(q, ref)
    assert not np.array_equal(q, x)  # the round trip did quantise


def test_frames_look_like_video():
    f = cal.frames(4, 8, 32, seed=0)
    assert f.shape == (4, 8, 3, 32, 32) and f.dtype == np.float32
    assert f.min() >= 0.0 and f.max() <= 1.0
    assert (f == 0.0).mean() < 0.01  # not the half-black frames of clipped N(0, 1)
    assert 0.2 < f.mean() < 0.8
    assert np.abs(np.diff(f, axis=1)).mean() > 1e-3  # something moves between frames


def _sampler_io(guidance: bool) -> IOSpec:
    c, n = TensorSpec("cond", "float32", ("batch", 16)), TensorSpec("z", "float32", ("batch", 8))
    g = TensorSpec("g", "float32", ("batch", 1), optional=True, default=2.5, low=1.0, high=3.0)
    roles = {ROLE_CONDITION: "cond", ROLE_NOISE: "z", **({ROLE_GUIDANCE: "g"} if guidance else {})}
    return IOSpec("s", (c, n, g) if guidance else (c, n), (TensorSpec("y", "float32", ("batch", 8)),), meta={ROLES: roles})


def test_sampler_feeds_default_guidance_unit_conditions():
    io = _sampler_io(True)
    f = cal.sampler_feeds(io, 64, seed=1)
    np.testing.assert_allclose(np.linalg.norm(f["cond"], axis=1), 1.0, atol=1e-6)
    assert (f["g"] == 2.5).all()  # the exported default, never 0
    assert abs(float(f["z"].std()) - 1.0) < 0.1
    emb = np.random.default_rng(0).standard_normal((64, 16)) * 3 + 1
    f = cal.sampler_feeds(io, 64, seed=1, conditions=lambda b, s: emb[:b], guidance=(2.5, 3.0))
    np.testing.assert_allclose(f["cond"], emb / np.linalg.norm(emb, axis=1, keepdims=True), rtol=1e-6)
    assert f["g"][:4, 0].tolist() == [2.5, 3.0, 2.5, 3.0]
    assert io.check_feeds(f) == 64
    assert set(cal.sampler_feeds(_sampler_io(False), 2)) == {"cond", "z"}


def test_single_input_refuses_multi_input_models():
    with pytest.raises(ValueError, match="expected one input"):
        cal.single_input(_sampler_io(False), np.zeros((1, 16)))
