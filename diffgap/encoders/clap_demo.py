"""``diffgap.demo``'s encoder step: synthesise a few clips with captions and embed them with CLAP."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .clap import ClapEncoder


_DEMO_CLIPS = (
    # (file stem, caption, how to synthesise it) -- distinct spectra so retrieval is non-trivial
    ("tone_440", "a steady 440 hertz sine tone", "sine"),
    ("sweep_up", "a rising sine sweep from low to high pitch", "sweep"),
    ("noise_white", "loud white noise hiss", "noise"),
    ("beeps", "short repeated beeps with silence between them", "beeps"),
    ("silence", "near silence", "silence"),
)


def _demo_signal(kind: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    if kind == "sine":
        x = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    elif kind == "sweep":
        k = np.log(8000.0 / 100.0) / seconds
        x = 0.5 * np.sin(2 * np.pi * 100.0 * (np.exp(k * t) - 1) / k)
    elif kind == "noise":
        x = 0.3 * rng.standard_normal(len(t))
    elif kind == "beeps":
        x = 0.5 * np.sin(2 * np.pi * 1000.0 * t) * ((t % 0.5) < 0.1)
    else:
        x = 1e-4 * rng.standard_normal(len(t))
    return np.clip(x, -1, 1).astype(np.float32)


def demo_embed(out_dir: str | os.PathLike, arch: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Show the encoder path end to end: synthesise clips + a Clotho-style captions CSV under
    ``out_dir/clips``, embed them with ``arch`` into ``out_dir/clap_pairs.npz`` (``diffgap embed``'s
    code path) and return a summary (paths, shape, text->audio cosine matrix, a few token ids).
    """
    import csv

    import soundfile as sf

    from diffgap.core.data import load_pairs
    from diffgap.encoders.dataset import embed_plan, plan_from_csv

    out_dir = Path(out_dir)
    clips = out_dir / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # varied rates/lengths/channels exercise the data path: 16 kHz mono 3 s ... 44.1 kHz stereo 12 s
    formats = [(16000, 1, 3.0), (44100, 2, 12.0), (48000, 1, 10.0), (22050, 2, 1.0), (48000, 1, 4.0)]
    with open(clips / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1"])
        for (stem, caption, kind), (sr, ch, secs) in zip(_DEMO_CLIPS, formats):
            x = _demo_signal(kind, secs, sr, rng)
            sf.write(clips / f"{stem}.wav", np.stack([x] * ch, 1) if ch > 1 else x, sr)
            w.writerow([f"{stem}.wav", caption])
    encoder = ClapEncoder.from_arch(arch, seed=seed)
    npz = out_dir / "clap_pairs.npz"
    embed_plan(plan_from_csv(clips / "captions.csv"), encoder, npz, batch_size=4, progress=False, overwrite=True)
    pairs = load_pairs(npz)
    cos = pairs["text"] @ pairs["audio"].T  # (N, N) text -> audio cosine (random weights: no semantics)
    return {
        "npz": str(npz), "n_pairs": len(pairs), "embed_dim": pairs.embed_dim, "arch": arch,
        "ids": pairs.ids.tolist(), "captions": pairs.captions.tolist(),
        "text_audio_cosine": cos.round(4).tolist(),
        "first_tokens": encoder.tokenize([pairs.captions[0]])["input_ids"][0, :8].tolist(),
        "unit_norm": bool(np.allclose(np.linalg.norm(pairs["audio"], axis=1), 1, atol=1e-5)),
    }
