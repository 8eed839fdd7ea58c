"""diffgap.runtime.pipeline and the `diffgap index` / `diffgap search` commands on real ORT sessions.

Expected values come from numpy references of the small test graphs (tests/runtime_graphs.py);
parity with the PyTorch model on a real export is in tests/test_runtime_parity.py.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import runtime_graphs as rg
from diffgap.core.iospec import ROLE_PROJECTED, ROLES
from diffgap.core.manifest import Manifest
from diffgap.runtime.session import open_model
from diffgap.runtime.pipeline import (
    DEFAULT_WEIGHTS,
    AudioSearch,
    AudioToTextBridge,
    GalleryIndex,
    TextToAudioBridge,
    build_index,
    make_noise,
)

N_GALLERY = 24


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return rg.make_export(tmp_path_factory.mktemp("pipeline") / "export", sampler_max_batch=8)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(7)
    audio = _unit(rng.standard_normal((N_GALLERY, rg.E))).astype(np.float32)
    text = _unit(audio + 0.3 * rng.standard_normal((N_GALLERY, rg.E))).astype(np.float32)
    ids = np.array([f"clip{i:03d}" for i in range(N_GALLERY)])
    captions = np.array([f"caption number {i}" for i in range(N_GALLERY)])
    return audio, text, ids, captions


@pytest.fixture(scope="module")
def index(export, pairs, tmp_path_factory):
    audio, text, ids, captions = pairs
    out = tmp_path_factory.mktemp("index") / "gallery"
    return build_index(export, out, audio=audio, ids=ids, text=text, captions=captions, caption_ids=ids, seed=5)


# -- noise ----------------------------------------------------------------------------------
def test_make_noise_rows_depend_only_on_their_seed():
    a = make_noise([3, 4, 3], 3, 8)
    assert a.dtype == np.float32 and a.shape == (3, 8)
    np.testing.assert_array_equal(a[0], a[2])
    np.testing.assert_array_equal(a[1], make_noise(4, 1, 8)[0])
    np.testing.assert_array_equal(a[1], np.random.default_rng(4).standard_normal(8).astype(np.float32))
    np.testing.assert_array_equal(make_noise(9, 5, 8), make_noise(9, 5, 8))
    with pytest.raises(ValueError, match="one int or 2 ints"):
        make_noise([1, 2, 3], 2, 8)
    with pytest.raises(ValueError, match="non-negative"):
        make_noise(-1, 2, 8)


# -- bridges --------------------------------------------------------------------------------
def test_text_to_audio_bridge_matches_reference(export):
    texts = ["a dog barks", "rain falls on a tin roof", "an engine idles"]
    with TextToAudioBridge(export, seed=11) as b:
        ids = b.tokenize(texts)["input_ids"]
        assert ids.shape == (3, rg.CONTEXT) and ids.dtype == np.int64
        res = b(texts)
        cond = rg.reference_text(ids)
        np.testing.assert_allclose(res.source, cond, atol=1e-6)
        ref_b, ref_p = rg.reference_sampler(cond, make_noise(11, 3, rg.D))
        np.testing.assert_allclose(res.bridged, ref_b, atol=1e-6)
        np.testing.assert_allclose(res.projected, ref_p, atol=1e-6)
        # a query's result does not depend on the batch it is sent with (its noise is its own; the
        # GEMM kernel ORT picks may differ with the batch size, hence rounding-level tolerance)
        np.testing.assert_allclose(b(texts[1:2]).bridged[0], res.bridged[1], atol=1e-6)


def test_bridge_sessions_sleep_between_calls_unless_told(export):
    """Encoder and sampler take turns on the same cores: the Bridge turns ORT's spin-waiting off by
    default; an explicit session option wins, and both settings give the same numbers."""
    cond = _unit(np.random.default_rng(2).standard_normal((2, rg.E))).astype(np.float32)
    with TextToAudioBridge(export) as quiet, TextToAudioBridge(export, spin_wait=True, intra_op_threads=2) as spin:
        assert quiet._session_options["spin_wait"] is False and spin._session_options["spin_wait"] is True
        np.testing.assert_array_equal(quiet.bridge_embeddings(cond, seed=0).bridged, spin.bridge_embeddings(cond, seed=0).bridged)


def test_bridge_chunks_batches_above_the_sampler_max(export):
    rng = np.random.default_rng(0)
    cond = _unit(rng.standard_normal((19, rg.E))).astype(np.float32)  # sampler max_batch is 8
    with AudioToTextBridge(export) as b:
        res = b.bridge_embeddings(cond, seed=np.arange(19))
    ref_b, _ = rg.reference_sampler(cond, make_noise(np.arange(19), 19, rg.D))
    np.testing.assert_allclose(res.bridged, ref_b, atol=1e-6)


def test_guidance_scale_reaches_the_graph(export):
    cond = _unit(np.random.default_rng(1).standard_normal((2, rg.E))).astype(np.float32)
    with TextToAudioBridge(export) as b:
        res = b.bridge_embeddings(cond, seed=0, guidance_scale=-1.0)
    ref_b, _ = rg.reference_sampler(cond, make_noise(0, 2, rg.D), -1.0)
    np.testing.assert_allclose(res.bridged, ref_b, atol=1e-6)


def test_audio_bridge_from_files(export, tmp_path):
    sf = pytest.importorskip("soundfile")
    from diffgap.core import audio as dga

    sr = 16000
    t = np.arange(int(1.5 * sr)) / sr
    sig = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "tone.wav", sig, sr)
    with AudioToTextBridge(export) as b:
        emb = b.encode([tmp_path / "tone.wav"])
        np.testing.assert_array_equal(b.waveforms([tmp_path / "tone.wav"]), dga.load_clips(tmp_path / "tone.wav"))
    # reference in float64: the frame means of a sine nearly cancel, so float32 summation order shows
    ref = rg.reference_audio(dga.load_clips(tmp_path / "tone.wav").astype(np.float64))
    np.testing.assert_allclose(emb, ref, atol=2e-5)


def test_bridge_bad_inputs(export):
    with TextToAudioBridge(export) as b:
        with pytest.raises(ValueError, match="list of strings"):
            b.encode("a dog barks")
        with pytest.raises(ValueError, match="empty caption"):
            b.encode(["ok", "  "])
        with pytest.raises(ValueError, match=r"condition must be \(N, 16\)"):
            b.bridge_embeddings(np.zeros((2, 15), np.float32))
        bad = np.ones((2, rg.E), np.float32)
        bad[1, 3] = np.nan
        with pytest.raises(ValueError, match=r"NaN/Inf \(first at row 1\)"):
            b.bridge_embeddings(bad)
        with pytest.raises(ValueError, match="noise must be float32"):
            b.bridge_embeddings(np.ones((2, rg.E), np.float32), noise=np.zeros((2, 3), np.float32))
    with AudioToTextBridge(export) as b:
        with pytest.raises(ValueError, match=r"waveforms must be \(B, 480000\)"):
            b.encode(np.zeros((1, 1000), np.float32))
        with pytest.raises(ValueError, match="missing"):
            b.encode(["/nonexistent/clip.wav"])


def test_sampler_without_the_projected_output_is_refused(export, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(export.root, root)
    d = json.loads((root / "manifest.json").read_text())
    io = d["models"]["diffgap_text_to_audio"]["io"]
    io["outputs"] = io["outputs"][:1]
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="roles .*projected.* name no declared tensor.*re-export"):
        TextToAudioBridge(root)
    del io["meta"][ROLES][ROLE_PROJECTED]  # a self-consistent declaration that no longer matches the graph
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="no tensor plays role 'projected'.*re-export"):
        TextToAudioBridge(root)
    with pytest.raises(ValueError, match="graph outputs .* differ from the declared"):
        open_model(Manifest.load(root), "diffgap_text_to_audio")


def test_export_without_roles_is_refused(export, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(export.root, root)
    d = json.loads((root / "manifest.json").read_text())
    del d["models"]["diffgap_text_to_audio"]["io"]["meta"][ROLES]  # written before roles existed
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="predates tensor roles.*re-export"):
        TextToAudioBridge(root)


# -- index + search -------------------------------------------------------------------------
def _z(s):
    """Per-query z-score over the gallery (how diffgap evaluate makes the four similarities comparable)."""
    return (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)


def _expected_scores(q_clap, q_seed, g_clap, g_seed, w=DEFAULT_WEIGHTS):
    qb, qp = rg.reference_sampler(q_clap, make_noise(q_seed, len(q_clap), rg.D))
    gb, gp = rg.reference_sampler(g_clap, make_noise(g_seed, len(g_clap), rg.D))
    return (w["raw"] * _z(_unit(q_clap) @ _unit(g_clap).T) + w["head"] * _z(qp @ gp.T)
            + w["query_bridge"] * _z(qb @ gp.T) + w["gallery_bridge"] * _z(qp @ gb.T))


def test_index_contents(index, pairs):
    audio, text, ids, captions = pairs
    ix = GalleryIndex.load(index)
    assert ix.meta["count"] == N_GALLERY and ix.meta["seed"] == 5 and ix.has_captions
    gb, gp = rg.reference_sampler(audio, make_noise(5, N_GALLERY, rg.D))
    _, head, bridged = ix.side("audio").raw()
    np.testing.assert_allclose(bridged, gb, atol=1e-6)
    np.testing.assert_allclose(head, gp, atol=1e-6)
    np.testing.assert_array_equal(ix.side("audio").ids, ids)
    np.testing.assert_array_equal(ix.side("text").captions, captions)


def test_text_search_matches_reference(export, index, pairs):
    audio, text, ids, _ = pairs
    with AudioSearch(index, export, seed=2) as s:
        got_ids, got_scores = s.search_embeddings(text[:5], k=4)
    exp = _expected_scores(text[:5], 2, audio, 5)
    order = np.argsort(-exp, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_allclose(got_scores, np.take_along_axis(exp, order, 1), atol=1e-5)
    assert (np.diff(got_scores, axis=1) <= 0).all()


def test_text_search_from_strings(export, index):
    with AudioSearch(index, export) as s:
        ids, scores = s.search(["a dog barks", "wind"], k=N_GALLERY)
        assert ids.shape == (2, N_GALLERY) and scores.dtype == np.float32
        emb = s.t2a.encode(["a dog barks", "wind"])
        ids2, scores2 = s.search_embeddings(emb, k=N_GALLERY)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(scores, scores2)


def test_audio_to_caption_search(export, index, pairs):
    audio, text, ids, captions = pairs
    with AudioSearch(index, export, seed=1) as s:
        cid, caps, scores = s.search_captions_embeddings(audio[:3], k=2)
    exp = _expected_scores(audio[:3], 1, text, 5)
    order = np.argsort(-exp, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(cid, ids[order])
    np.testing.assert_array_equal(caps, captions[order])
    np.testing.assert_allclose(scores, np.take_along_axis(exp, order, 1), atol=1e-5)


def test_custom_weights(export, index, pairs):
    audio, text, ids, _ = pairs
    w = {"raw": 1.0, "head": 0.0, "query_bridge": 0.0, "gallery_bridge": 0.0}
    with AudioSearch(index, export, weights=w) as s:
        ids_, scores = s.search_embeddings(text[:2], k=1)
    raw = text[:2] @ audio.T
    np.testing.assert_array_equal(ids_[:, 0], ids[raw.argmax(1)])
    np.testing.assert_allclose(scores[:, 0], _z(raw).max(1), atol=1e-5)
    # diffgap evaluate's component names are accepted
    with AudioSearch(index, export, weights={"raw": 0.5, "heads": 0.5, "q-bridge src": 0.0}) as s:
        assert s.weights == {"raw": 0.5, "head": 0.5, "query_bridge": 0.0, "gallery_bridge": 0.0}
    with pytest.raises(ValueError, match="unknown score terms"):
        AudioSearch(index, export, weights={"bogus": 1.0})
    with pytest.raises(ValueError, match="not all zero"):
        AudioSearch(index, export, weights={"raw": 0.0})


def test_index_of_another_model_is_refused(export, index, tmp_path):
    other = rg.make_export(tmp_path / "other", seed=1)
    man = Manifest.load(other.root)
    man.checkpoint_sha256 = "1" * 64
    man.save()
    with pytest.raises(ValueError, match=r"built with another model: checkpoint_sha256"):
        AudioSearch(index, other.root)


def test_bad_index_files(export, tmp_path):
    """More damaged-index cases are in tests/test_search.py."""
    with pytest.raises(FileNotFoundError, match="build it with `diffgap index"):
        GalleryIndex.load(tmp_path / "missing")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="older single-file format; rebuild it"):
        GalleryIndex.load(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="ids must be unique"):
        build_index(export, tmp_path / "d", audio=np.ones((2, rg.E), np.float32), ids=["a", "a"])
    ix = build_index(export, tmp_path / "nocap", audio=np.ones((2, rg.E), np.float32), ids=["a", "b"])
    with AudioSearch(ix, export) as s:
        with pytest.raises(ValueError, match="has no captions"):
            s.search_captions_embeddings(np.ones((1, rg.E), np.float32))
        with pytest.raises(ValueError, match="k must be >= 1"):
            s.search_embeddings(np.ones((1, rg.E), np.float32), k=0)


# -- the CLI --------------------------------------------------------------------------------
def test_cli_index_and_search(export, pairs, tmp_path, capsys):
    from diffgap.cli import main
    from diffgap.core.data import save_pairs

    audio, text, ids, captions = pairs
    npz = save_pairs(tmp_path / "pairs.npz", ids=ids, audio=audio, text=text, captions=captions)
    out = tmp_path / "gallery"
    assert main(["index", str(export.root), "--npz", str(npz), "--out", str(out), "--quiet"]) == 0
    assert f"{N_GALLERY} gallery items, {N_GALLERY} captions, engine exact" in capsys.readouterr().out
    assert main(["index", str(export.root), "--npz", str(npz), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    assert main(["search", "a dog barks", "--index", str(out), "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    with AudioSearch(out, export) as s:
        exp_ids, exp_scores = s.search(["a dog barks"], k=3)
    assert [h["id"] for h in res["queries"][0]["results"]] == list(exp_ids[0])
    np.testing.assert_allclose([h["score"] for h in res["queries"][0]["results"]], exp_scores[0], atol=1e-6)

    assert main(["search", "a dog barks", "--index", str(out), "--export", str(export.root), "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("query: a dog barks") and exp_ids[0][0] in table

    sf = pytest.importorskip("soundfile")
    sr = 16000
    sf.write(tmp_path / "q.wav", (0.2 * np.sin(2 * np.pi * 300 * np.arange(sr) / sr)).astype(np.float32), sr)
    assert main(["search", "--audio", str(tmp_path / "q.wav"), "--index", str(out), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    with AudioSearch(out, export) as s:
        exp_cid, exp_caps, _ = s.search_captions([tmp_path / "q.wav"], k=2)
    assert [h["id"] for h in hits] == list(exp_cid[0]) and [h["caption"] for h in hits] == list(exp_caps[0])

    assert main(["search", "x", "--index", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["search", "--index", str(out)]) == 2
    assert "at least one text query" in capsys.readouterr().err


def test_cli_index_audio_dir(export, tmp_path, capsys):
    sf = pytest.importorskip("soundfile")
    from diffgap.cli import main

    d = tmp_path / "clips"
    d.mkdir()
    sr = 22050
    t = np.arange(sr) / sr
    for i, f in enumerate((220, 330, 550)):
        sf.write(d / f"tone{i}.wav", (0.2 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr)
    (d / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    out = tmp_path / "g"
    assert main(["index", str(export.root), "--audio-dir", str(d), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.wav" in printed and "3 gallery items" in printed
    ix = GalleryIndex.load(out)
    assert sorted(ix.side("audio").ids.tolist()) == ["tone0.wav", "tone1.wav", "tone2.wav"]
    assert main(["search", "a low hum", "--index", str(out), "-k", "2"]) == 0
