"""The CLAP-like synthetic benchmark: seeded, no linear component in the distortion, calibrated."""
from dataclasses import replace

import numpy as np
import pytest

from diffgap import synth
from diffgap.core.data import load_pairs


def test_seeded_and_split_sizes():
    cfg = replace(synth.SynthConfig(), n_train=50, n_val=20, n_test=30)
    a, b = synth.generate(cfg), synth.generate(cfg)
    assert {k: len(v) for k, v in a.items()} == {"train": 50, "val": 20, "test": 30}
    for split in a:
        np.testing.assert_array_equal(a[split]["text"], b[split]["text"])
    c = synth.generate(replace(cfg, seed=1))
    assert not np.array_equal(a["test"]["audio"], c["test"]["audio"])
    assert np.allclose(np.linalg.norm(a["test"]["audio"], axis=1), 1.0, atol=1e-5)


def test_distortion_has_no_linear_component():
    """The generator's own distortion (the one its embeddings use): least squares on the semantic
    factors explains ~nothing (R^2 ~ k/n for n samples, k regressors), while it is not negligible."""
    cfg = synth.SynthConfig()
    gen = synth.SynthGenerator(cfg)
    rng = np.random.default_rng(0)
    s = rng.standard_normal((20000, cfg.semantic_dim))
    for m in gen.modalities:
        d = gen.distortion(m, s)
        coef, *_ = np.linalg.lstsq(s, d, rcond=None)
        r2 = 1 - ((d - s @ coef) ** 2).sum() / ((d - d.mean(0)) ** 2).sum()
        assert r2 < 0.01, (m, r2)
        assert 0.5 < float((d ** 2).sum(1).mean()) < 2.0, m  # E||d||^2 ~ 1


def test_embeddings_follow_the_documented_formula():
    """With the private factors and both noises off, each embedding is exactly the module docstring's
    normalise(A s / sqrt(k) + a_d A d^m(s) + g^m), recomputed here from the generator's own maps."""
    cfg = replace(synth.SynthConfig(), private_scale=0.0, noise_scale=0.0, inner_noise_scale=0.0)
    s = np.random.default_rng(1).standard_normal((64, cfg.semantic_dim))
    gen = synth.SynthGenerator(cfg)
    for m in gen.modalities:
        x = (s / np.sqrt(cfg.semantic_dim) + cfg.distortion_scale * gen.distortion(m, s)) @ gen.A.T + gen.mods[m].offset
        want = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(gen._embed(m, s, np.random.default_rng(2)), want, rtol=0, atol=1e-6)
    # the two modalities' distortions are different maps, and their gap offsets are opposite
    t, a = gen.modalities
    assert np.abs(gen.distortion(t, s) - gen.distortion(a, s)).mean() > 0.1
    np.testing.assert_allclose(gen.mods[t].offset, -gen.mods[a].offset)
    assert np.linalg.norm(gen.mods[t].offset - gen.mods[a].offset) == pytest.approx(cfg.gap)


def test_write_produces_valid_files(tmp_path):
    cfg = replace(synth.SynthConfig(), n_train=40, n_val=10, n_test=10)
    paths = synth.write(tmp_path, cfg)
    p = load_pairs(paths["train"], embed_dim=512, require=("text", "audio"))
    assert len(p) == 40 and p.captions is not None
    assert (tmp_path / "synth.json").exists()


def _raw_r1(cfg: synth.SynthConfig) -> float:
    test = synth.generate(cfg)["test"]
    return synth.recall_at_1(test["text"], test["audio"])


def test_each_nuisance_alone_lowers_recall_and_none_leaves_it_perfect():
    """Without any nuisance a text finds its own audio (the gap offset is common to all items);
    raising any one of them (private factors, distortion, noise inside / outside the semantic
    subspace) strictly lowers raw text-to-audio R@1: each is drawn per modality, not shared by a pair."""
    nuisances = ("private_scale", "distortion_scale", "inner_noise_scale", "noise_scale")
    base = replace(synth.SynthConfig(), n_train=10, n_val=10, n_test=500, **{k: 0.0 for k in nuisances})
    assert _raw_r1(base) == 1.0
    for k in nuisances:
        r1 = [_raw_r1(replace(base, **{k: v})) for v in (1.5, 3.0)]
        assert 1.0 > r1[0] > r1[1], (k, r1)


@pytest.mark.slow
def test_linear_adapter_cannot_undo_the_distortion():
    """A linear contrastive adapter trained on the train split improves on raw cosine (the gap offset
    and the private subspaces are linear), but stays below raw cosine on the same benchmark without
    the distortion: a linear map wins back less than the Hermite distortion costs."""
    cfg = synth.SynthConfig()
    rep = synth.calibration_report(cfg, adapter=True)
    assert rep["adapter_gain"] > 0.0, rep
    no_distortion = 100 * _raw_r1(replace(cfg, n_train=10, distortion_scale=0.0))
    assert rep["linear_adapter_t2a_r1"] < no_distortion, (rep, no_distortion)


def test_synth_cli(tmp_path, capsys):
    from diffgap.cli import main

    rc = main(["synth", "--out", str(tmp_path), "--n-train", "30", "--n-val", "10", "--n-test", "10", "--seed", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "raw_t2a_r1=" in out and "wrote" in out
    assert len(load_pairs(tmp_path / "test.npz")) == 10
