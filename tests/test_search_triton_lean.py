"""The Triton search where validation gave the bridged terms weight 0: the ensemble runs the text head
in place of the noise model and the sampler, the index is D wide, and the served results equal the
in-process search, which equals ``fuse_scores`` of every term computed in full."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import triton_fixtures
from diffgap.core.manifest import Manifest
from diffgap.core.names import head_name, noise_model_name, sampler_name
from diffgap.runtime import AudioSearch, AudioToTextBridge, GalleryIndex, TextToAudioBridge, build_index, fuse_scores
from diffgap.runtime.fusion import fusion_weights
from diffgap.triton_models import repository as R

pytest.importorskip("tritonclient.http")

K = 4
TEXTS = ["a dog barks in the distance", "rain falling on a tin roof"]
HEADS_ONLY = {"raw": 0.0, "heads": 1.0, "q-bridge": 0.0, "g-bridge": 0.0}


def _heads_only_export(tmp_path_factory):
    """The shared export with the fusion weights `diffgap export --fusion-weights` would store for a
    validation that kept only the heads (manifest.json is not among the hashed files)."""
    root = tmp_path_factory.mktemp("lean_export") / "export"
    shutil.copytree(triton_fixtures.shared_export(tmp_path_factory), root)
    d = json.loads((root / "manifest.json").read_text())
    d.setdefault("extra", {})["fusion_weights"] = {"text_to_audio": HEADS_ONLY, "audio_to_text": HEADS_ONLY}
    (root / "manifest.json").write_text(json.dumps(d))
    return root


def test_served_search_runs_the_head_not_the_sampler(tmp_path_factory):
    export = _heads_only_export(tmp_path_factory)
    man = Manifest.load(export, verify=True)
    work = tmp_path_factory.mktemp("lean_search")
    rng = np.random.default_rng(3)
    audio = rng.standard_normal((60, man.input_dim("audio"))).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    ids = np.array([f"a{i:03d}" for i in range(len(audio))])
    ix = build_index(export, work / "ix", audio=audio, ids=ids)
    head_dim = man.model(head_name("text")).io.outputs[0].feature_shape[0]
    assert GalleryIndex.load(ix).side("audio").vectors.shape == (len(ids), head_dim)

    models = R.plan_repository(man, index=ix, top_k=K)
    steps = [s["model_name"] for s in models[R.SEARCH_ENSEMBLE].config["ensemble_scheduling"]["step"]]
    assert head_name("text") in steps and sampler_name("text", "audio") not in steps and noise_model_name("text", "audio") not in steps
    assert [t["name"] for t in models[R.SEARCH].config["input"]] == [R.OUTPUTS["projected"]]

    with AudioSearch(ix, export) as s:
        ref_ids, ref_scores = s.search(TEXTS, k=K)
        text = s.t2a.encode(TEXTS)
        assert s.t2a._sampler is None
    with TextToAudioBridge(export) as t2a, AudioToTextBridge(export) as a2t:
        full = fuse_scores(t2a.bridge_embeddings(text), *(lambda g: (g.source, g.projected, g.bridged))(a2t.bridge_embeddings(audio)),
                           fusion_weights(man, None, "text_to_audio"))
    order = np.argsort(-full, 1, kind="stable")[:, :K]
    np.testing.assert_array_equal(ref_ids, ids[order])
    np.testing.assert_allclose(ref_scores, np.take_along_axis(full, order, 1), atol=1e-5)

    repo = R.build_repository(export, work / "repo", flavor="portable", index=ix, top_k=K)
    served_ids, served_scores = triton_fixtures.served_search(repo, work, TEXTS)
    np.testing.assert_array_equal(served_ids, ref_ids)
    assert np.abs(served_scores - ref_scores).max() <= 1e-5
