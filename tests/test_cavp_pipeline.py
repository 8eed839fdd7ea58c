"""The video-audio path through the core: cavp presets, the synthetic video-audio benchmark and
V2A/A2V retrieval in ``diffgap eval``, on a tiny CPU run."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffgap.core.errors import UserError
from diffgap import synth
from diffgap.cli import main
from diffgap.config import get_preset
from diffgap.core.data import load_pairs
from diffgap.models import DiffGAP

SMALL = dataclasses.replace(synth.VIDEO_AUDIO_CONFIG, n_train=600, n_val=120, n_test=120)


def test_cavp_presets_directions_and_bridge():
    for name in ("cavp-512", "cavp-tiny"):
        cfg = get_preset(name)
        assert cfg.modalities == ("video", "audio") and cfg.embed_dim == 512
        assert set(cfg.directions) == {"video_given_audio", "audio_given_video"}
    cfg = get_preset("cavp-tiny")
    model = DiffGAP(cfg).eval()
    x = torch.randn(3, cfg.embed_dim)
    for d in cfg.directions:
        out = model.bridge(d, x, torch.randn(3, cfg.heads.dim), steps=2)
        assert out.shape == (3, cfg.heads.dim) and torch.isfinite(out).all()


def test_video_audio_benchmark_is_the_same_generator():
    va = synth.generate(SMALL, synth.VIDEO_AUDIO)["test"]
    ta = synth.generate(SMALL, synth.TEXT_AUDIO)["test"]
    assert va.modalities == ("video", "audio") and va.captions is None
    # Same random maps in the same order: only the first modality's name differs.
    np.testing.assert_array_equal(va["video"], ta["text"])
    np.testing.assert_array_equal(va["audio"], ta["audio"])
    # Its own seed: a different draw from the text-audio benchmark's default seed.
    default = synth.generate(dataclasses.replace(SMALL, seed=synth.SynthConfig().seed), synth.TEXT_AUDIO)["test"]
    assert not np.allclose(default["audio"], va["audio"])
    with pytest.raises(UserError, match="two distinct names"):
        synth.SynthGenerator(SMALL, ("video", "video"))


def test_synth_train_eval_video_audio(tmp_path, capsys):
    data, ck = tmp_path / "va", tmp_path / "ck"
    common = ["--n-train", "600", "--n-val", "120", "--n-test", "120"]
    # no --seed: video-audio defaults to its own benchmark's seed, not the text-audio one
    assert main(["synth", "--out", str(data), "--modalities", "video-audio", *common]) == 0
    assert json.loads((data / "synth.json").read_text())["modalities"] == ["video", "audio"]
    test = load_pairs(data / "test.npz", require=("video", "audio"))
    np.testing.assert_array_equal(test["video"], synth.generate(SMALL, synth.VIDEO_AUDIO)["test"]["video"])
    assert main(["train", "--data", str(data / "train.npz"), "--out", str(ck), "--preset", "cavp-tiny",
                 "--steps", "20", "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", str(ck), "--data", str(data / "test.npz"), "--val", str(data / "val.npz"),
                 "--bootstrap", "20", "--noise-samples", "1", "--noise-steps", "2"]) == 0
    res = json.loads((ck / "eval.json").read_text())
    assert set(res["tasks"]) == {"video->audio", "audio->video"}  # V2A and A2V
    for task in res["tasks"].values():
        raw = task["rows"]["raw"]
        assert 0.0 <= raw["R@1"] <= raw["R@5"] <= raw["R@10"] <= 100.0
    out = capsys.readouterr().out
    assert "Retrieval video->audio" in out and "Retrieval audio->video" in out


def test_synth_cli_seed_overrides_the_video_audio_default(tmp_path):
    common = ["--n-train", "60", "--n-val", "20", "--n-test", "20"]
    assert main(["synth", "--out", str(tmp_path), "--modalities", "video-audio", "--seed", "5", *common]) == 0
    small = dataclasses.replace(synth.VIDEO_AUDIO_CONFIG, n_train=60, n_val=20, n_test=20, seed=5)
    test = load_pairs(tmp_path / "test.npz", require=("video", "audio"))
    np.testing.assert_array_equal(test["audio"], synth.generate(small, synth.VIDEO_AUDIO)["test"]["audio"])
