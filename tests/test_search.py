"""Gallery search at scale: the fused score as one inner product, the index directory (streaming,
resumable, refused when damaged), the engines (exact, FAISS, Milvus Lite) and `diffgap index/search`.

References are independent of the code under test: ``fuse_scores`` (the evaluation's four z-scored
cosine matrices) on embeddings bridged by the numpy reference sampler of tests/runtime_graphs.py.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import runtime_graphs as rg
from diffgap.core.errors import UserError
from diffgap.core.manifest import Manifest
from diffgap.runtime import AudioSearch, BridgeResult, GalleryIndex, build_index, fuse_scores, make_noise
from diffgap.runtime.fusion import DEFAULT_WEIGHTS, Moments, gallery_block, query_vectors, top_k

N = 60


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng, n, d, centers=8, spread=0.35):
    """Unit vectors around a few centres: structured like real embeddings (random ones have no neighbours)."""
    c = rng.standard_normal((centers, d))
    return _unit(c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d)))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return rg.make_export(tmp_path_factory.mktemp("search") / "export", sampler_max_batch=8)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(3)
    audio = _clustered(rng, N, rg.E)
    text = _unit(audio + 0.4 * rng.standard_normal((N, rg.E)))
    ids = np.array([f"clip{i:04d}" for i in range(N)])
    return audio, text, ids, np.array([f"caption {i}" for i in range(N)])


@pytest.fixture(scope="module")
def index(export, pairs, tmp_path_factory):
    audio, text, ids, caps = pairs
    return build_index(export, tmp_path_factory.mktemp("ix") / "gallery", audio=audio, ids=ids, text=text,
                       captions=caps, caption_ids=ids, seed=5, chunk_size=16)


def _bridge(cond, seed):
    b, p = rg.reference_sampler(cond, make_noise(seed, len(cond), rg.D))
    return BridgeResult(source=cond, projected=p, bridged=b)


# -- the derivation -------------------------------------------------------------------------------
def test_fused_score_is_one_inner_product():
    """U(q).V(g) + offset(q) with streamed gallery moments equals fuse_scores' four z-scored cosines."""
    rng = np.random.default_rng(0)
    n, e, d = 500, 24, 12
    # off-centre, unnormalised embeddings: the z-scores' means and variances matter
    g = [rng.standard_normal((n, k)) + 2.0 for k in (e, d, d)]
    q = BridgeResult(*(rng.standard_normal((7, k)).astype(np.float32) + 1.5 for k in (e, d, d)))
    for w in (DEFAULT_WEIGHTS, {"raw": 0.7, "head": 0.0, "query_bridge": 0.2, "gallery_bridge": 0.1}):
        ref = fuse_scores(q, *(x.astype(np.float32) for x in g), w)
        v = gallery_block(*g).astype(np.float64)
        shift = v[:37].mean(0)
        m = Moments((e, d, d))
        for a in range(0, n, 37):  # uneven chunks
            m.update((v[a:a + 37] - shift).astype(np.float32))
        u, off = query_vectors(q, m.stats(), w)
        got = u @ (v - shift).astype(np.float32).T + off[:, None]
        assert np.abs(got - ref).max() < 1e-5
        np.testing.assert_array_equal(np.argsort(-got, 1, kind="stable")[:, :20], np.argsort(-ref, 1, kind="stable")[:, :20])


def test_top_k_keeps_ties_in_index_order():
    s = np.array([[0.5, 0.9, 0.9, 0.1, 0.9, 0.2]], np.float32)
    idx, val = top_k(s, 2)
    assert idx.tolist() == [[1, 2]] and val.tolist() == [[np.float32(0.9)] * 2]
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, (4, 50)).astype(np.float32)
    for k in (1, 7, 50):
        np.testing.assert_array_equal(top_k(s, k)[0], np.argsort(-s, 1, kind="stable")[:, :k])


# -- exact engine vs today's scoring --------------------------------------------------------------
def test_exact_equals_fuse_scores_both_directions(export, index, pairs):
    audio, text, ids, caps = pairs
    with AudioSearch(index, export, seed=2) as s:
        got_ids, got = s.search_embeddings(text[:6], k=N)
        cid, ccap, cgot = s.search_captions_embeddings(audio[:4], k=N)
    gb = _bridge(audio, 5)
    ref = fuse_scores(_bridge(text[:6], 2), gb.source, gb.projected, gb.bridged, DEFAULT_WEIGHTS)
    order = np.argsort(-ref, 1, kind="stable")
    np.testing.assert_array_equal(got_ids, ids[order])
    assert np.abs(got - np.take_along_axis(ref, order, 1)).max() < 1e-5
    tb = _bridge(text, 5)
    ref = fuse_scores(_bridge(audio[:4], 2), tb.source, tb.projected, tb.bridged, DEFAULT_WEIGHTS)
    order = np.argsort(-ref, 1, kind="stable")
    np.testing.assert_array_equal(cid, ids[order])
    np.testing.assert_array_equal(ccap, caps[order])
    assert np.abs(cgot - np.take_along_axis(ref, order, 1)).max() < 1e-5


def test_index_directory_contents(index, pairs):
    audio, _, ids, _ = pairs
    ix = GalleryIndex.load(index)
    m = json.loads((index / "manifest.json").read_text())
    assert m["format"] == "diffgap-index/2" and m["engine"]["name"] == "exact" and m["count"] == N and m["captions"] == N
    assert set(m["fusion_weights"]) == {"text_to_audio", "audio_to_text"} and m["model"]["head_dim"] == rg.D
    side = ix.side("audio")
    assert isinstance(side.vectors, np.memmap) and side.vectors.dtype == np.float32 and side.vectors.shape == (N, rg.E + 2 * rg.D)
    np.testing.assert_array_equal(side.ids, ids)
    x, h, b = side.raw()
    gb = _bridge(audio, 5)
    np.testing.assert_allclose(x, audio, atol=1e-6)
    np.testing.assert_allclose(h, gb.projected, atol=1e-6)
    np.testing.assert_allclose(b, gb.bridged, atol=1e-6)
    assert not list(index.parent.glob(".gallery.*")), "no build leftovers"


def test_streaming_build_and_resume(export, pairs, tmp_path, caplog):
    audio, _, ids, _ = pairs
    ref = build_index(export, tmp_path / "ref", audio=audio, ids=ids, chunk_size=1000)
    calls = []

    def stop_after_two(stage, done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "ix"
    with pytest.raises(KeyboardInterrupt):
        build_index(export, out, audio=audio, ids=ids, chunk_size=7, progress=stop_after_two)
    assert not out.exists() and (tmp_path / ".ix.partial").is_dir()
    seen = []
    with caplog.at_level("INFO", logger="diffgap.runtime.gallery_build"):
        build_index(export, out, audio=audio, ids=ids, chunk_size=7, progress=lambda s, d, t: seen.append(d))
    assert "resuming" in caplog.text and seen[0] == 21, seen  # chunks 1-2 were kept; the third is the first rebuilt
    a, b = GalleryIndex.load(ref).side("audio"), GalleryIndex.load(out).side("audio")
    for x, y in zip(b.raw(), a.raw()):  # the shift differs with the chunk size; the vectors do not
        np.testing.assert_allclose(x, y, atol=1e-6)
    np.testing.assert_allclose(b.stats["mean"] + b.stats["shift"], a.stats["mean"] + a.stats["shift"], atol=1e-6)
    for k in ("cov_clap", "cov_head", "cov_bridged"):
        np.testing.assert_allclose(b.stats[k], a.stats[k], atol=1e-6)
    # an interrupted build of other inputs is discarded, not mixed in
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_index(export, out, audio=audio[::-1].copy(), ids=ids, chunk_size=7, progress=stop_after_two)
    caplog.clear()
    with caplog.at_level("INFO", logger="diffgap.runtime.gallery_build"):
        build_index(export, out, audio=audio, ids=ids, chunk_size=7)
    assert "discarding an interrupted build" in caplog.text and not (tmp_path / ".ix.partial").exists()


# -- approximate engines ------------------------------------------------------------------------
def _recall(got, ref):
    return np.mean([len(set(g) & set(r)) / len(r) for g, r in zip(got, ref)])


@pytest.mark.parametrize("engine,params,knobs", [
    ("faiss-hnsw", {"m": 8}, {"ef_search": 64}),
    ("faiss-hnsw", {"m": 8, "storage": "sq8"}, {"ef_search": 64, "refine": 4}),
    ("faiss-ivf", {"nlist": 8}, {"nprobe": 8}),
    ("faiss-ivf", {"nlist": 8, "storage": "pq", "pq_m": 4, "kmeans_iters": 4}, {"nprobe": 8, "refine": 8}),
])
def test_faiss_engines_recall(export, tmp_path, engine, params, knobs):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    n = 1500
    audio, ids = _clustered(rng, n, rg.E, centers=20), np.array([f"a{i}" for i in range(n)])
    q = _unit(audio[:20] + 0.3 * rng.standard_normal((20, rg.E)))
    exact = build_index(export, tmp_path / "exact", audio=audio, ids=ids)
    ann = build_index(export, tmp_path / "ann", audio=audio, ids=ids, engine=engine, engine_params=params)
    meta = json.loads((ann / "manifest.json").read_text())
    assert meta["engine"]["name"] == engine and meta["sides"]["audio"]["engine_params"]["factory"]
    with AudioSearch(exact, export) as s:
        ref_ids, ref = s.search_embeddings(q, k=10)
    with AudioSearch(ann, export) as s:
        got_ids, got = s.search_embeddings(q, k=10, **knobs)
        low_ids, _ = s.search_embeddings(q, k=10, **{k: 1 for k in knobs})   # the per-query knob is honoured
    assert _recall(got_ids, ref_ids) >= 0.9
    hit = got_ids == ref_ids  # rescored exactly: a found item carries its exact fused score
    np.testing.assert_allclose(got[hit], ref[hit], atol=1e-5)
    assert _recall(low_ids, ref_ids) <= _recall(got_ids, ref_ids)


def test_milvus_lite_flat_equals_exact(export, index, pairs, tmp_path):
    pytest.importorskip("pymilvus")
    audio, text, ids, caps = pairs
    mil = build_index(export, tmp_path / "mil", audio=audio, ids=ids, text=text, captions=caps, caption_ids=ids,
                      seed=5, engine="milvus", engine_params={"index_type": "FLAT"})
    with AudioSearch(index, export) as s:
        ref_ids, ref = s.search_embeddings(text[:5], k=10)
        rc, _, rcs = s.search_captions_embeddings(audio[:3], k=5)
    with AudioSearch(mil, export) as s:
        got_ids, got = s.search_embeddings(text[:5], k=10)
        gc, _, gcs = s.search_captions_embeddings(audio[:3], k=5)
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(gc, rc)
    np.testing.assert_allclose(gcs, rcs, atol=1e-5)
    with pytest.raises(UserError, match=r"cannot reach Milvus at http://127.0.0.1:9 .*start the server"):
        AudioSearch(mil, export, engine_options={"uri": "http://127.0.0.1:9"})
    with pytest.raises(UserError, match=r"cannot reach Milvus at http://127.0.0.1:9 "):
        build_index(export, tmp_path / "nowhere", audio=audio, ids=ids, engine="milvus", engine_params={"uri": "http://127.0.0.1:9"})
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / ".nowhere.partial").exists()


# -- bad input --------------------------------------------------------------------------------
def test_bad_search_requests(export, index, pairs):
    audio, text, _, _ = pairs
    with AudioSearch(index, export) as s:
        for k in (0, -1):
            with pytest.raises(UserError, match="k must be >= 1"):
                s.search_embeddings(text[:1], k=k)
        with pytest.raises(UserError, match=f"k={N + 1} exceeds the gallery size {N}"):
            s.search_embeddings(text[:1], k=N + 1)
        with pytest.raises(UserError, match="takes no per-query setting"):
            s.search_embeddings(text[:1], k=3, nprobe=4)
        with pytest.raises(ValueError, match=r"condition must be \(N, 16\)"):
            s.search_embeddings(np.ones((1, 12), np.float32), k=3)


def test_bad_builds(export, pairs, tmp_path):
    audio, _, ids, _ = pairs
    with pytest.raises(UserError, match="gallery is empty"):
        build_index(export, tmp_path / "e", audio=np.zeros((0, rg.E), np.float32), ids=[])
    with pytest.raises(UserError, match=r"audio must be \(N, 16\), got shape \(4, 12\)"):
        build_index(export, tmp_path / "d", audio=np.ones((4, 12), np.float32), ids=list("abcd"))
    with pytest.raises(UserError, match="ids must be unique"):
        build_index(export, tmp_path / "u", audio=audio[:2], ids=["a", "a"])
    with pytest.raises(UserError, match="unknown search engine 'annoy'"):
        build_index(export, tmp_path / "x", audio=audio, ids=ids, engine="annoy")
    with pytest.raises(UserError, match=r"has no parameter\(s\) \['nprob'\]"):
        build_index(export, tmp_path / "x", audio=audio, ids=ids, engine="faiss-ivf", engine_params={"nprob": 3})
    with pytest.raises(UserError, match=r"storage must be one of \('flat', 'fp16', 'sq8'\), got 'pq'"):
        build_index(export, tmp_path / "x", audio=audio, ids=ids, engine="faiss-hnsw", engine_params={"storage": "pq"})
    assert not list(tmp_path.iterdir()), "nothing half-written"


def test_damaged_or_foreign_indexes(export, index, pairs, tmp_path):
    other = rg.make_export(tmp_path / "other", seed=1)
    man = Manifest.load(other.root)
    man.checkpoint_sha256 = "1" * 64
    man.save()
    with pytest.raises(UserError, match="built with another model: checkpoint_sha256"):
        AudioSearch(index, other.root)
    with pytest.raises(FileNotFoundError, match="build it with `diffgap index"):
        GalleryIndex.load(tmp_path / "missing")
    old = tmp_path / "old.npz"
    np.savez(old, meta=np.array("{}"))
    with pytest.raises(UserError, match="older single-file format; rebuild it with `diffgap index"):
        GalleryIndex.load(old)

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(index, d)
        edit(d)
        return d

    trunc = damaged("trunc", lambda d: (d / "audio_vectors.npy").write_bytes((d / "audio_vectors.npy").read_bytes()[:-64]))
    with pytest.raises(UserError, match=r"audio_vectors.npy is .* bytes, expected .* \(truncated or altered\); rebuild"):
        GalleryIndex.load(trunc)

    def flip(d):
        b = bytearray((d / "text_stats.npz").read_bytes())
        b[len(b) // 2] ^= 0xFF
        (d / "text_stats.npz").write_bytes(bytes(b))
    with pytest.raises(UserError, match="text_stats.npz is corrupt"):
        GalleryIndex.load(damaged("flip", flip))
    with pytest.raises(ValueError, match="index manifest .* is not valid JSON"):
        GalleryIndex.load(damaged("json", lambda d: (d / "manifest.json").write_text("{")))
    with pytest.raises(UserError, match="no manifest.json .*interrupted or damaged build"):
        GalleryIndex.load(damaged("nomani", lambda d: (d / "manifest.json").unlink()))

    def dims(d):
        m = json.loads((d / "manifest.json").read_text())
        m["model"]["embed_dim"] = 32
        (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="another model: embed_dim 32 .index. vs 16 .export."):
        AudioSearch(damaged("dims", dims), export)
    nocap = build_index(export, tmp_path / "nocap", audio=pairs[0][:5], ids=pairs[2][:5])
    with AudioSearch(nocap, export) as s, pytest.raises(UserError, match="has no captions"):
        s.search_captions_embeddings(pairs[0][:1], k=1)


# -- the CLI ------------------------------------------------------------------------------------
def test_cli_index_and_search_with_an_engine(export, pairs, tmp_path, capsys):
    pytest.importorskip("faiss")
    from diffgap.cli import main
    from diffgap.core.data import save_pairs

    audio, text, ids, caps = pairs
    npz = save_pairs(tmp_path / "pairs.npz", ids=ids, audio=audio, text=text, captions=caps)
    out = tmp_path / "gallery"
    assert main(["index", str(export.root), "--npz", str(npz), "--out", str(out), "--engine", "faiss-hnsw",
                 "--param", "m=8", "--param", "storage=sq8"]) == 0
    printed = capsys.readouterr().out
    assert f"{N} gallery items, {N} captions" in printed and "faiss-hnsw" in printed
    assert main(["search", "a dog barks", "--index", str(out), "-k", "3", "--ef-search", "32", "--refine", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    with AudioSearch(out, export) as s:
        exp_ids, exp = s.search(["a dog barks"], k=3, ef_search=32, refine=2)
    assert [h["id"] for h in res["queries"][0]["results"]] == list(exp_ids[0])
    np.testing.assert_allclose([h["score"] for h in res["queries"][0]["results"]], exp[0], atol=1e-6)
    assert main(["search", "x", "--index", str(out), "-k", str(N + 1)]) == 2
    assert f"exceeds the gallery size {N}" in capsys.readouterr().err
    assert main(["search", "x", "--index", str(out), "--nprobe", "3"]) == 2
    assert "faiss-hnsw takes no per-query setting(s) ['nprobe']" in capsys.readouterr().err
    assert main(["index", str(export.root), "--npz", str(npz), "--out", str(tmp_path / "g2"), "--param", "m"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
