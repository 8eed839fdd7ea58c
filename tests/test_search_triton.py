"""The Triton `audio_gallery_search` model runs the index's own engine: served results equal in-process
search on the same index directory. One server (slow to start) on 127.0.0.1, always stopped."""
from __future__ import annotations

import json

import numpy as np
import pytest

import triton_fixtures
from diffgap.core.manifest import Manifest
from diffgap.runtime import AudioSearch, build_index
from diffgap.triton_models import repository as R
from diffgap.triton_models.server import TritonServer

httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("faiss")

K = 4
TEXTS = ["a dog barks in the distance", "rain falling on a tin roof"]


def _gallery(export, n=300):
    rng = np.random.default_rng(8)
    e = Manifest.load(export).embed_dim
    c = rng.standard_normal((10, e))
    audio = c[rng.integers(0, 10, n)] + 0.4 * rng.standard_normal((n, e))
    return (audio / np.linalg.norm(audio, axis=1, keepdims=True)).astype(np.float32), np.array([f"a{i:04d}" for i in range(n)])


def test_milvus_index_ships_with_its_uri_parameter(tmp_path_factory, tmp_path):
    pytest.importorskip("pymilvus")
    export = triton_fixtures.shared_export(tmp_path_factory)
    audio, ids = _gallery(export, 40)
    ix = build_index(export, tmp_path / "mil", audio=audio, ids=ids, engine="milvus")
    models = R.plan_repository(Manifest.load(export), index=ix, top_k=K)
    params = {p["key"]: p["value"]["string_value"] for p in models[R.SEARCH].config["parameters"]}
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
    with TritonServer(repo, cwd=triton_fixtures.torch_blocker(work / "notorch")) as server:
        client = server.http_client()
        x = httpclient.InferInput(R.TEXT, [len(TEXTS), 1], "BYTES")
        x.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in TEXTS], dtype=object))
        r = client.infer(R.SEARCH_ENSEMBLE, [x])
    np.testing.assert_array_equal(r.as_numpy(R.SEARCH_IDS).astype(str), ref_ids)
    assert np.abs(r.as_numpy(R.SEARCH_SCORES) - ref_scores).max() <= 1e-5
