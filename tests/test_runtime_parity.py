"""Every Pipeline result equals the PyTorch path, on a real ``diffgap export`` of a DiffGAP model.

One module-scoped export (``diffgap.export.cli.export_all``: clap-tiny preset with seeded random
weights, the offline ``tiny`` CLAP encoders, FP32 graphs) is opened through ``diffgap.runtime`` on
ORT CPU and compared with ``DiffGAP.bridge`` / ``DiffGAP.project`` and ``ClapEncoder`` in PyTorch.

Tolerance: the export's own bound for ORT CPU FP32 vs PyTorch, max abs <= 1e-4 (diffgap.export.check); the
runtime adds nothing numerical to the graphs (same feeds, same noise), so the same bound holds
end to end. Search is checked by ids (exact) and scores (<= 1e-4).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffgap.runtime.pipeline import (  # noqa: E402
    AudioSearch,
    AudioToTextBridge,
    TextToAudioBridge,
    build_index,
    make_noise,
    top_k,
)

ATOL = 1e-4  # the export check's bound: ORT CPU FP32 vs PyTorch max abs diff <= 1e-4
TEXTS = ["a dog barks twice", "rain on a tin roof", "a violin plays", "wind through trees", "an engine idles"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(export dir, DiffGAP model, ClapEncoder) — the same weights on both sides."""
    from diffgap.checkpoint import load_checkpoint, save_checkpoint
    from diffgap.config import get_preset
    from diffgap.encoders.clap import ClapEncoder
    from diffgap.export.cli import export_all
    from diffgap.models import DiffGAP

    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    model = DiffGAP(get_preset("clap-tiny"))
    # A fresh model is degenerate for this purpose: the denoisers' output layers are zero-initialised
    # (adaLN-zero), so every bridged embedding would be the same vector. Perturb every weight, and
    # give the head-space statistics non-trivial values, as after training.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modalities:
            getattr(model, f"stats_mean_{m}").normal_(0, 0.02)
            getattr(model, f"stats_std_{m}").uniform_(0.08, 0.16)
    save_checkpoint(root / "ckpt", model)
    model, _ = load_checkpoint(root / "ckpt")
    model.eval()
    res = export_all(root / "ckpt", root / "export", encoders="tiny", fp16=False, encoder_seed=0)
    enc = ClapEncoder.from_arch("tiny", seed=0)
    return res.out, model, enc


def _torch_bridge(model, direction, cond, noise, g=None):
    _, source = direction.split("_given_")
    with torch.no_grad():
        c = torch.from_numpy(cond)
        bridged = model.bridge(direction, c, torch.from_numpy(noise), guidance_scale=g, eta=0.0)
        projected = model.project(source, c)
    return bridged.numpy(), projected.numpy()


def _clips(n: int, seed: int = 0) -> np.ndarray:
    from diffgap.core import audio as dga

    rng = np.random.default_rng(seed)
    sr = 16000
    t = np.arange(sr * 2) / sr
    waves = [0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size) for i in range(n)]
    return np.concatenate([dga.prepare_clips(w.astype(np.float32), sr) for w in waves])


@pytest.mark.parametrize("batch", [1, 3])
def test_text_to_audio_bridge_equals_pytorch(stack, batch):
    export, model, enc = stack
    texts = TEXTS[:batch]
    with TextToAudioBridge(export, seed=7) as b:
        got = b(texts)
    cond = enc.encode_text(texts)
    np.testing.assert_allclose(got.source, cond, atol=ATOL)
    ref_b, ref_p = _torch_bridge(model, "audio_given_text", cond, make_noise(7, batch, got.bridged.shape[1]))
    np.testing.assert_allclose(np.linalg.norm(ref_b, axis=1), 1.0, atol=1e-5)  # a real, unit-norm output
    np.testing.assert_allclose(got.bridged, ref_b, atol=ATOL)
    np.testing.assert_allclose(got.projected, ref_p, atol=ATOL)


def test_audio_to_text_bridge_equals_pytorch(stack):
    export, model, enc = stack
    wav = _clips(3)
    with AudioToTextBridge(export, seed=3) as b:
        got = b(wav)
    with torch.no_grad():
        cond = enc.encode_clip_groups([w[None] for w in wav])
    np.testing.assert_allclose(got.source, cond, atol=ATOL)
    ref_b, ref_p = _torch_bridge(model, "text_given_audio", cond, make_noise(3, 3, got.bridged.shape[1]))
    np.testing.assert_allclose(got.bridged, ref_b, atol=ATOL)
    np.testing.assert_allclose(got.projected, ref_p, atol=ATOL)


def test_guidance_and_per_row_seeds_equal_pytorch(stack):
    export, model, _ = stack
    rng = np.random.default_rng(5)
    cond = rng.standard_normal((6, 512)).astype(np.float32)
    cond /= np.linalg.norm(cond, axis=1, keepdims=True)
    seeds = [0, 1, 2, 0, 1, 2]
    with TextToAudioBridge(export) as b:
        got = b.bridge_embeddings(cond, seed=seeds, guidance_scale=3.0)
    noise = make_noise(seeds, 6, got.bridged.shape[1])
    ref_b, _ = _torch_bridge(model, "audio_given_text", cond, noise, g=3.0)
    np.testing.assert_allclose(got.bridged, ref_b, atol=ATOL)
    # the bridge really depends on its inputs (so the parity above is not a constant compared with itself)
    assert np.abs(ref_b[0] - ref_b[1]).max() > 1e-2
    ref_1, _ = _torch_bridge(model, "audio_given_text", cond, noise, g=1.0)
    assert np.abs(ref_b - ref_1).max() > 1e-3


def test_search_equals_pytorch_scoring(stack, tmp_path):
    export, model, enc = stack
    rng = np.random.default_rng(9)
    n = 20
    audio = rng.standard_normal((n, 512)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    ids = np.array([f"g{i:02d}" for i in range(n)])
    ix = build_index(export, tmp_path / "ix.npz", audio=audio, ids=ids, seed=4)
    with AudioSearch(ix, export, seed=8) as s:
        got_ids, got_scores = s.search(TEXTS, k=5)
        weights = s.weights
    # the same scores from PyTorch embeddings
    q = enc.encode_text(TEXTS)
    D = model.config.heads.dim
    qb, qp = _torch_bridge(model, "audio_given_text", q, make_noise(8, len(TEXTS), D))
    gb, gp = _torch_bridge(model, "text_given_audio", audio, make_noise(4, n, D))
    # diffgap evaluate's "full" fusion of the four cosine matrices, computed by the evaluation's code
    from diffgap.core.retrieval import cosine, fuse

    sims = [cosine(q, audio), cosine(qp, gp), cosine(qb, gp), cosine(qp, gb)]
    scores = fuse(sims, tuple(weights[k] for k in ("raw", "head", "query_bridge", "gallery_bridge")))
    idx, exp_scores = top_k(scores, 5)
    np.testing.assert_array_equal(got_ids, ids[idx])
    np.testing.assert_allclose(got_scores, exp_scores, atol=ATOL)
