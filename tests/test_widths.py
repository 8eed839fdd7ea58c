"""Any embedding width, end to end, and fusion terms of weight 0 skipped everywhere.

A tiny paired dataset of 384-d (and of 384-d text with 768-d audio) embeddings goes through
`diffgap train` -> checkpoint reload -> export (no encoders) -> runtime sessions -> index -> search;
the runtime's outputs are checked against the PyTorch model (an independent implementation of the
same function), and fused scores against ``fuse_scores`` of every term computed in full.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgap.checkpoint import load_checkpoint, read_config
from diffgap.cli import main as cli_main
from diffgap.core.data import save_pairs
from diffgap.core.manifest import Manifest
from diffgap.core.names import head_name, sampler_name
from diffgap.export.cli import export_all
from diffgap.runtime import pipeline
from diffgap.runtime.fusion import fuse_scores, fusion_weights
from diffgap.runtime.gallery import GalleryIndex
from diffgap.runtime.gallery_build import build_index
from diffgap.runtime.pipeline import AudioToTextBridge, TextToAudioBridge, make_noise
from diffgap.runtime.search import AudioSearch

N = 96  # >= clap-tiny's batch of 64


def _pairs(path, e_text: int, e_audio: int, seed: int = 0):
    """Paired unit vectors: text and audio are two random linear views of one shared latent."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, 32))
    text = z @ rng.standard_normal((32, e_text)) + 0.1 * rng.standard_normal((N, e_text))
    audio = z @ rng.standard_normal((32, e_audio)) + 0.1 * rng.standard_normal((N, e_audio))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return save_pairs(path, ids=[f"p{i}" for i in range(N)], text=unit(text), audio=unit(audio),
                      captions=[f"caption {i}" for i in range(N)])


@pytest.fixture(scope="module", params=[(384, 384), (384, 768)], ids=["384", "384-768"])
def trained(request, tmp_path_factory):
    e_text, e_audio = request.param
    root = tmp_path_factory.mktemp(f"w{e_text}-{e_audio}")
    data = _pairs(root / "train.npz", e_text, e_audio)
    rc = cli_main(["train", "--data", str(data), "--out", str(root / "ckpt"), "--preset", "clap-tiny",
                   "--steps", "3", "--no-progress"])
    assert rc == 0
    return root, {"text": e_text, "audio": e_audio}


def test_train_takes_the_widths_from_the_data(trained, capsys):
    root, dims = trained
    cfg = read_config(root / "ckpt")
    assert cfg.input_dims == dims and cfg.heads.dim == 64  # the preset kept its sizes
    model, _ = load_checkpoint(root / "ckpt")
    for m, e in dims.items():
        assert model.heads.heads[m].linear.in_features == e
    # a width the model was not trained on is refused with the widths named
    other = _pairs(root / "other.npz", 512, 512)
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(root / "ckpt"), "--data", str(other), "--val", str(other)]) == 2
    err = capsys.readouterr().err
    assert "512" in err and str(min(dims.values())) in err, err


@pytest.fixture(scope="module")
def exported(trained):
    root, dims = trained
    res = export_all(root / "ckpt", root / "export", encoders=None, fp16=False, steps=1)
    return root, dims, res.manifest


def test_export_and_runtime_match_pytorch(exported):
    root, dims, man = exported
    man = Manifest.load(man.root, verify=True)
    assert {m: man.input_dim(m) for m in dims} == dims
    assert {sampler_name("text", "audio"), sampler_name("audio", "text"), head_name("text"), head_name("audio")} <= set(man.models)
    model, _ = load_checkpoint(root / "ckpt")
    rng = np.random.default_rng(1)
    for cls in (TextToAudioBridge, AudioToTextBridge):
        with cls(man) as b:
            x = rng.standard_normal((5, dims[b.source])).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            r = b.bridge_embeddings(x, seed=np.arange(5))
            with torch.no_grad():
                noise = torch.from_numpy(make_noise(np.arange(5), 5, b.head_dim))
                ref = model.bridge(f"{b.target}_given_{b.source}", torch.from_numpy(x), noise).numpy()
                proj = model.project(b.source, torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(r.bridged, ref, atol=1e-4)
            np.testing.assert_allclose(r.projected, proj, atol=1e-4)
            np.testing.assert_allclose(b.project(x), proj, atol=1e-4)  # the head alone: the same function


def _gallery(man, n=40, seed=2):
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(rng.standard_normal((n, man.input_dim("audio")))), unit(rng.standard_normal((n, man.input_dim("text")))), \
        [f"g{i}" for i in range(n)]


def _reference_scores(man, weights, queries, gallery, seed_q=7, index_seed=0):
    """fuse_scores of every term computed in full (both samplers run), text -> audio."""
    audio, _, _ = gallery
    with TextToAudioBridge(man) as t2a, AudioToTextBridge(man, seed=index_seed) as a2t:
        q = t2a.bridge_embeddings(queries, seed=seed_q)
        g = a2t.bridge_embeddings(audio)
    return fuse_scores(q, g.source, g.projected, g.bridged, weights)


def test_index_and_search_any_width(exported, tmp_path):
    _, dims, man = exported
    audio, text, ids = _gallery(man)
    build_index(man, tmp_path / "ix", audio=audio, ids=ids, text=text, captions=ids, caption_ids=ids)
    w = fusion_weights(man, None, "text_to_audio")
    if dims["text"] != dims["audio"]:
        assert w["raw"] == 0.0  # two widths: the raw cosine does not exist, the default leaves it out
    with AudioSearch(tmp_path / "ix", man) as s:
        got = s.score_text_embeddings(text[:6], seed=7)
        found, _ = s.search_embeddings(text[:6], k=3, seed=7)
        caps, _, _ = s.search_captions_embeddings(audio[:2], k=2)
    ref = _reference_scores(man, w, text[:6], (audio, text, ids))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert found.shape == (6, 3) and caps.shape == (2, 2)
    assert [list(r) for r in found] == [[ids[j] for j in np.argsort(-row, kind="stable")[:3]] for row in ref]


BRIDGES_OFF = {"raw": 0.0, "heads": 1.0, "q-bridge": 0.0, "g-bridge": 0.0}


@pytest.fixture(scope="module")
def heads_only_export(trained):
    root, _ = trained
    res = export_all(root / "ckpt", root / "export-heads", encoders=None, fp16=False, steps=1,
                     fusion_weights={"text_to_audio": BRIDGES_OFF, "audio_to_text": BRIDGES_OFF})
    return res.manifest


def test_zero_weight_terms_cost_nothing(heads_only_export, tmp_path, monkeypatch):
    man = heads_only_export
    D = man.model(sampler_name("text", "audio")).io.outputs[0].feature_shape[0]
    audio, text, ids = _gallery(man)
    opened: list[str] = []
    real_open = pipeline.open_model
    monkeypatch.setattr(pipeline, "open_model", lambda m, name, *a, **k: opened.append(name) or real_open(m, name, *a, **k))
    build_index(man, tmp_path / "ix", audio=audio, ids=ids, text=text, captions=ids, caption_ids=ids)
    ix = GalleryIndex.load(tmp_path / "ix")
    for side in ("audio", "text"):
        assert ix.side(side).vectors.shape == (len(ids), D) and ix.side(side).spaces == ("head",)
    with AudioSearch(ix, man) as s:
        got = s.score_text_embeddings(text[:6], seed=7)
        caps, _, _ = s.search_captions_embeddings(audio[:3], k=2)
    assert caps.shape == (3, 2)
    assert opened and not any(n.startswith("diffgap_") for n in opened), opened  # heads only, no sampler
    monkeypatch.undo()
    w = fusion_weights(man, None, "text_to_audio")
    assert w == {"raw": 0.0, "head": 1.0, "query_bridge": 0.0, "gallery_bridge": 0.0}
    np.testing.assert_allclose(got, _reference_scores(man, w, text[:6], (audio, text, ids)), atol=1e-4)


def test_partly_skipped_and_full_index_agree(heads_only_export, tmp_path):
    """Weights that keep the gallery-side bridge but not the query-side one: a full index (every
    block) and the skipping one rank and score alike; asking a skipping index for a term it left
    out is refused."""
    man = heads_only_export
    audio, text, ids = _gallery(man)
    weights = {"raw": 0.0, "head": 1.0, "query_bridge": 0.0, "gallery_bridge": 0.5}
    full = build_index(man, tmp_path / "full", audio=audio, ids=ids, all_blocks=True)
    lean = build_index(man, tmp_path / "lean", audio=audio, ids=ids)
    assert GalleryIndex.load(full).side("audio").spaces == ("clap", "head", "bridged")
    with AudioSearch(full, man, weights=weights) as s:
        got = s.score_text_embeddings(text[:5], seed=7)
    np.testing.assert_allclose(got, _reference_scores(man, weights, text[:5], (audio, text, ids)), atol=1e-4)
    with AudioSearch(lean, man, weights=weights) as s:
        with pytest.raises(ValueError, match="left out.*rebuild the index"):
            s.score_text_embeddings(text[:5], seed=7)


def test_config_and_manifest_widths_round_trip(exported, tmp_path):
    """One width keeps the layout older diffgap wrote (and reads); two widths travel as embed_dims;
    an export manifest written before embed_dims existed reads its one embed_dim for every modality."""
    import json

    from diffgap.config import DiffGAPConfig, get_preset

    cfg = get_preset("clap-512")
    assert "embed_dims" not in cfg.to_dict() and cfg.input_dims == {"text": 512, "audio": 512}
    same = cfg.with_input_dims({"text": 384, "audio": 384})
    assert same.to_dict() == {**cfg.to_dict(), "embed_dim": 384}
    mixed = cfg.with_input_dims({"text": 384, "audio": 768})
    assert DiffGAPConfig.from_dict(mixed.to_dict()) == mixed and mixed.input_dims == {"text": 384, "audio": 768}
    assert mixed.heads == cfg.heads and mixed.denoiser == cfg.denoiser
    with pytest.raises(ValueError, match="embed_dims names"):
        cfg.replace(embed_dims={"video": 3})
    _, _, man = exported
    d = json.loads((man.root / "manifest.json").read_text())
    d.pop("embed_dims")
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    old = Manifest.load(tmp_path)
    assert old.input_dim("text") == old.input_dim("audio") == d["embed_dim"]
