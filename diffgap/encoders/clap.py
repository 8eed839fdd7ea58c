"""CLAP encoders on the ``laion-clap`` package: :class:`ClapEncoder` embeds text and audio.

Three ways to get a laion-clap ``CLAP`` model (always the package's own classes, never a copy):

* ``ClapEncoder.from_checkpoint(path)`` -- a real LAION-CLAP checkpoint (``630k-audioset-best.pt`` ...):
  HTSAT-tiny/base audio tower + RoBERTa text tower (:mod:`diffgap.encoders.clap_checkpoint`).
* ``ClapEncoder.from_arch("htsat-tiny")`` -- HTSAT-tiny + laion-clap's ``transformer`` text tower with
  its bundled CLIP BPE tokenizer, random weights, fully offline (:mod:`diffgap.encoders.clap_arch`).
* ``ClapEncoder.from_arch("tiny")`` -- the same code with reduced widths/depths (tests, demo).

Both embed through the exportable modules of :mod:`diffgap.encoders.clap_modules`, so eager
embeddings and ONNX graphs share one path. The laion-clap internals this needs are patched, scoped,
in :mod:`diffgap.encoders.laion_clap_patch`. This module re-exports the names users import from it
(the demo's encoder step is :func:`diffgap.encoders.clap_demo.demo_embed`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from diffgap.core import audio as daudio
from diffgap.core.tokenizer import CONTEXT_LENGTH, ClipBPETokenizer

from .clap_arch import ARCHS, ClapArch, build_clap_model, get_arch, model_cfg
from .clap_checkpoint import load_clap_checkpoint, write_clap_checkpoint
from .clap_modules import (
    CLIP_SAMPLES, EMBED_DIM, SAMPLE_RATE, ClapAudioEncoderModule, ClapTextEncoderModule, audio_io_spec, text_io_spec,
)

__all__ = [
    "ARCHS", "CLIP_SAMPLES", "CONTEXT_LENGTH", "EMBED_DIM", "SAMPLE_RATE", "ClapArch", "ClapAudioEncoderModule",
    "ClapEncoder", "ClapTextEncoderModule", "audio_io_spec", "build_clap_model", "get_arch",
    "load_clap_checkpoint", "model_cfg", "save_checkpoint", "text_io_spec",
]


class ClapEncoder:
    """A laion-clap CLAP model with its tokenizer: ``encode_text`` / ``encode_audio`` -> (B, 512).

    Both run through the exportable modules, so eager embeddings and ONNX graphs share one path.
    """

    def __init__(self, model: nn.Module, model_cfg: dict, arch: ClapArch, tokenizer, source: str) -> None:
        self.model = model.eval()
        self.model_cfg = model_cfg
        self.arch = arch
        self.tokenizer = tokenizer
        self.source = source
        self.text_module = ClapTextEncoderModule(model).eval()
        self.audio_module = ClapAudioEncoderModule(model).eval()

    @classmethod
    def from_arch(cls, name: str = "tiny", seed: int = 0) -> "ClapEncoder":
        """A named offline architecture (``tiny`` | ``htsat-tiny``) with seeded random weights."""
        arch = get_arch(name)
        model, cfg = build_clap_model(arch, seed=seed)
        return cls(model, cfg, arch, ClipBPETokenizer.from_file(), source=f"arch:{name}:seed{seed}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, roberta_dir: str | os.PathLike | None = None) -> "ClapEncoder":
        """A LAION-CLAP checkpoint file (non-fusion HTS-AT; RoBERTa or transformer text tower)."""
        model, cfg, arch, tokenizer = load_clap_checkpoint(path, roberta_dir)
        return cls(model, cfg, arch, tokenizer, source=str(Path(path).resolve()))

    @classmethod
    def load(cls, arch: str | None = None, checkpoint: str | os.PathLike | None = None,
             roberta_dir: str | os.PathLike | None = None, seed: int = 0) -> "ClapEncoder":
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint, roberta_dir)
        return cls.from_arch(arch or "tiny", seed)

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """texts -> the text encoder's feed dict, keyed by the roles its IOSpec declares."""
        return self.tokenizer.feeds(list(texts), self.text_module.io_spec())

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """texts -> (B, 512) float32, L2-normalised."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        out = []
        for i in range(0, len(texts), batch_size):
            feeds = self.tokenize(texts[i:i + batch_size])
            out.append(self.text_module(*(torch.from_numpy(feeds[n]) for n in self.text_module.io_spec().input_names)))
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    # -- audio -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_clips(self, clips: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Prepared clips (N, 480000) float32 -> (N, 512) (no preprocessing applied)."""
        clips = np.ascontiguousarray(clips, dtype=np.float32)
        if clips.ndim != 2 or clips.shape[1] != CLIP_SAMPLES:
            raise ValueError(f"clips must be (N, {CLIP_SAMPLES}) float32, got {clips.shape}; use diffgap.core.audio.prepare_clips")
        out = [self.audio_module(torch.from_numpy(clips[i:i + batch_size])) for i in range(0, len(clips), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, EMBED_DIM), np.float32)

    def encode_audio(self, waveforms: Sequence[np.ndarray] | np.ndarray, sample_rate: int = SAMPLE_RATE,
                     long_clip: str = "center", batch_size: int = 8) -> np.ndarray:
        """waveforms (each (T,) or (T, C), any length, at ``sample_rate``) -> (B, 512) float32.

        laion-clap's data path (:mod:`diffgap.core.audio`): mono, 48 kHz, int16 round trip, repeat-pad;
        longer clips follow ``long_clip`` ("chunks" averages the normalised chunk embeddings).
        """
        per_item = [daudio.prepare_clips(np.asarray(w), sample_rate, long_clip) for w in waveforms]
        return self.encode_clip_groups(per_item, batch_size)

    def encode_clip_groups(self, per_item: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """One (n_i, 480000) group of prepared clips per item -> (items, 512); groups of n_i > 1
        (long_clip="chunks") average their L2-normalised embeddings and re-normalise."""
        if not per_item:
            return np.zeros((0, EMBED_DIM), np.float32)
        emb = self.encode_clips(np.concatenate(per_item), batch_size)
        out, i = np.empty((len(per_item), EMBED_DIM), np.float32), 0
        for j, clips in enumerate(per_item):
            e = emb[i:i + len(clips)]
            i += len(clips)
            if len(e) == 1:
                out[j] = e[0]
            else:
                m = e.mean(axis=0)
                out[j] = m / max(float(np.linalg.norm(m)), 1e-12)
        return out

    def info(self) -> dict[str, Any]:
        return {"arch": dataclasses.asdict(self.arch), "source": self.source,
                "tokenizer": self.tokenizer.kind, "embed_dim": EMBED_DIM}


def save_checkpoint(encoder: ClapEncoder, path: str | os.PathLike) -> Path:
    """Write ``encoder``'s weights as a LAION-CLAP-style checkpoint (+ its named arch), atomically;
    :meth:`ClapEncoder.from_checkpoint` reads it back."""
    return write_clap_checkpoint(encoder.model, encoder.arch, path)
