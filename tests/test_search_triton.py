"""Search on a real export (the Triton tests' clap-tiny export): the exact engine equals the four-matrix
``fuse_scores`` both directions, and the Triton `audio_gallery_search` model runs the index's own engine
(served results equal in-process search on the same index directory). One server (slow to start) on
127.0.0.1, always stopped."""
from __future__ import annotations

import json

import numpy as np
import pytest

import triton_fixtures
from diffgap.core.manifest import Manifest
from diffgap.runtime import AudioSearch, AudioToTextBridge, TextToAudioBridge, build_index, fuse_scores
from diffgap.runtime.pipeline import fusion_weights
from diffgap.triton_models import repository as R

pytest.importorskip("tritonclient.http")
pytest.importorskip("faiss")

K = 4
TEXTS = ["a dog barks in the distance", "rain falling on a tin roof"]


def _gallery(export, n=300):
    rng = np.random.default_rng(8)
    e = Manifest.load(export).embed_dim
    c = rng.standard_normal((10, e))
    audio = c[rng.integers(0, 10, n)] + 0.4 * rng.standard_normal((n, e))
    return (audio / np.linalg.norm(audio, axis=1, keepdims=True)).astype(np.float32), np.array([f"a{i:04d}" for i in range(n)])


def test_exact_equals_fuse_scores_on_a_real_export(tmp_path_factory, tmp_path):
    export = triton_fixtures.shared_export(tmp_path_factory)
    man = Manifest.load(export)
    audio, ids = _gallery(export, 120)
    rng = np.random.default_rng(2)
    text = audio + 0.5 * rng.standard_normal(audio.shape).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    ix = build_index(export, tmp_path / "ix", audio=audio, ids=ids, text=text, captions=ids, caption_ids=ids, seed=3, chunk_size=50)
    with AudioSearch(ix, export, seed=1) as s:
        got_ids, got = s.search_embeddings(text[:8], k=len(ids))
        cid, _, cgot = s.search_captions_embeddings(audio[:8], k=len(ids))
    with TextToAudioBridge(export, seed=3) as t2a, AudioToTextBridge(export, seed=3) as a2t:
        gal_a, gal_t = a2t.bridge_embeddings(audio), t2a.bridge_embeddings(text)
        q_t, q_a = t2a.bridge_embeddings(text[:8], seed=1), a2t.bridge_embeddings(audio[:8], seed=1)
    for q, g, task, gi, gs in ((q_t, gal_a, "text_to_audio", got_ids, got), (q_a, gal_t, "audio_to_text", cid, cgot)):
        ref = fuse_scores(q, g.source, g.projected, g.bridged, fusion_weights(man, None, task))
        order = np.argsort(-ref, 1, kind="stable")
        np.testing.assert_array_equal(gi, ids[order])
        assert np.abs(gs - np.take_along_axis(ref, order, 1)).max() <= 1e-5


def test_milvus_index_ships_with_its_uri_parameter(tmp_path_factory, tmp_path):
    pytest.importorskip("pymilvus")
    export = triton_fixtures.shared_export(tmp_path_factory)
    audio, ids = _gallery(export, 40)
    ix = build_index(export, tmp_path / "mil", audio=audio, ids=ids, engine="milvus")
    models = R.plan_repository(Manifest.load(export), index=ix, top_k=K)
    params = {k: v["string_value"] for k, v in models[R.SEARCH].config["parameters"].items()}
    assert params["milvus_uri"] == ""  # empty: the embedded Milvus Lite file in 1/index
    assert {"ef_search", "nprobe", "refine"} <= set(params)
    assert json.loads(models[R.SEARCH].files["search.json"])["engine"] == "milvus"
    assert models[R.SEARCH].files["index"] == ix


def test_served_faiss_search_equals_in_process(tmp_path_factory):
    export = triton_fixtures.shared_export(tmp_path_factory)
    work = tmp_path_factory.mktemp("search_triton")
    audio, ids = _gallery(export)
    ix = build_index(export, work / "hnsw", audio=audio, ids=ids, engine="faiss-hnsw", engine_params={"m": 8, "storage": "sq8"})
    repo = R.build_repository(export, work / "repo", flavor="portable", index=ix, top_k=K)
    assert (repo / R.SEARCH / "1" / "index" / "audio.faiss-hnsw.faiss").is_file()
    with AudioSearch(ix, export) as s:
        ref_ids, ref_scores = s.search(TEXTS, k=K)
    served_ids, served_scores = triton_fixtures.served_search(repo, work, TEXTS)
    np.testing.assert_array_equal(served_ids, ref_ids)
    assert np.abs(served_scores - ref_scores).max() <= 1e-5
