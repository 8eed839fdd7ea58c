"""CAVP encoders (Diff-Foley's Stage-1 contrastive audio-visual pre-training): the exportable modules
and :class:`CavpEncoder`, which embeds video frames and audio into the CAVP space DiffGAP bridges.

The networks and where they come from: :mod:`diffgap.encoders.cavp_networks`; settings:
:mod:`diffgap.encoders.cavp_config`; checkpoints: :mod:`diffgap.encoders.cavp_checkpoint`. The names
users import from here stay importable from here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from diffgap.core.iospec import BATCH, BATCH_PROFILES, BatchProfile, IOSpec, TensorSpec
from diffgap.core.names import encoder_name

from .cavp_checkpoint import load_cavp_state_dict
from .cavp_config import CAVP_CONFIGS, CavpConfig, get_cavp_config
from .cavp_networks import CavpModel, LogMelSpectrogram, slaney_mel_filterbank

log = logging.getLogger(__name__)

__all__ = [
    "CavpConfig",
    "CAVP_CONFIGS",
    "get_cavp_config",
    "CavpModel",
    "CavpVideoEncoderModule",
    "CavpAudioEncoderModule",
    "CavpEncoder",
    "load_cavp_state_dict",
    "LogMelSpectrogram",
    "slaney_mel_filterbank",
]


# ---- exportable modules --------------------------------------------------------------------------
class _CavpTowerModule(nn.Module):
    """Export wrapper of one CAVP tower: its input tensor -> its L2-normalised embedding (B, E) float32.
    A subclass names the tower (``EXPORT_NAME``, ``MODALITY``) and declares its input in ``io_spec``."""

    EXPORT_NAME: str
    MODALITY: str

    def __init__(self, model: CavpModel, batch: BatchProfile | None = None) -> None:
        super().__init__()
        self.batch = BATCH_PROFILES[self.EXPORT_NAME] if batch is None else batch
        self.model = model
        self.config = model.config
        # Inference-only wrapper. Exporters restore the wrapper's *original* mode recursively after
        # tracing, so it must start in eval or BatchNorm would switch to batch statistics.
        self.eval()

    def _io_spec(self, inp: TensorSpec) -> IOSpec:
        c = self.config
        return IOSpec(
            name=self.EXPORT_NAME,
            inputs=(inp,),
            outputs=(TensorSpec(f"{self.MODALITY}_embedding", "float32", (BATCH, c.embed_dim),
                                doc=f"L2-normalised CAVP {self.MODALITY} embedding"),),
            min_batch=self.batch[0], opt_batch=self.batch[1], max_batch=self.batch[2],
            meta={"encoder": "cavp", "modality": self.MODALITY, "cavp_config": c.to_dict()},
        )


class CavpVideoEncoderModule(_CavpTowerModule):
    """Export wrapper: ``frames`` (B, T, 3, H, W) float32 in [0, 1] -> ``video_embedding`` (B, E) float32."""

    EXPORT_NAME = encoder_name("video", "cavp")
    MODALITY = "video"

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.encode_video(frames)

    def io_spec(self) -> IOSpec:
        c = self.config
        return self._io_spec(TensorSpec(
            "frames", "float32", (BATCH, c.num_frames, 3, c.image_size, c.image_size), low=0.0, high=1.0,
            doc=f"RGB frames at {c.fps:g} fps, {c.image_size}x{c.image_size}, values in [0, 1] (diffgap.core.video.load_frames)",
        ))


class CavpAudioEncoderModule(_CavpTowerModule):
    """Export wrapper: ``waveform`` (B, clip_samples) float32 -> ``audio_embedding`` (B, E) float32."""

    EXPORT_NAME = encoder_name("audio", "cavp")
    MODALITY = "audio"

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.model.encode_audio(waveform)

    def io_spec(self) -> IOSpec:
        c = self.config
        return self._io_spec(TensorSpec(
            "waveform", "float32", (BATCH, c.clip_samples), low=-1.0, high=1.0,
            doc=f"mono waveform at {c.sample_rate} Hz, {c.clip_samples} samples ({c.clip_seconds:.2f} s), "
                "zero-padded/cropped from the start (CavpEncoder.prepare_audio)",
        ))


# ---- user-facing encoder -----------------------------------------------------------------------
def _as_float_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise ValueError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise ValueError(f"{what} must be float (or uint8 frames), got {t.dtype}")
    t = t.float()
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN/Inf; clean the input")
    return t


class CavpEncoder:
    """Frozen CAVP encoders with the CLAP encoders' interface: ``encode_video`` / ``encode_audio`` ->
    L2-normalised (B, 512) float32 numpy arrays.

    Build with :meth:`from_config` (random weights; ``"full"`` or ``"tiny"``) or :meth:`from_checkpoint`
    (Diff-Foley's released CAVP weights).
    """

    def __init__(self, model: CavpModel, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        # The exportable graphs (attributes, as on ClapEncoder): each declares its I/O with io_spec().
        self.video_module = CavpVideoEncoderModule(self.model)
        self.audio_module = CavpAudioEncoderModule(self.model)

    @classmethod
    def from_config(cls, config: str | CavpConfig = "full", seed: int = 0, **kw: Any) -> "CavpEncoder":
        torch.manual_seed(seed)
        return cls(CavpModel(config), **kw)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: str | CavpConfig = "full", **kw: Any) -> "CavpEncoder":
        model = CavpModel(config)
        load_cavp_state_dict(model, path)
        return cls(model, **kw)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # -- input preparation --------------------------------------------------------------------
    def prepare_audio(self, waveforms: Any) -> torch.Tensor:
        """(B, N) array or a list of 1-D arrays at ``config.sample_rate`` -> (B, clip_samples).

        Policy (Diff-Foley ``wav2spec.get_spectrogram``): keep the first ``clip_samples`` samples,
        zero-pad shorter clips at the end.
        """
        n = self.config.clip_samples
        if isinstance(waveforms, (list, tuple)):
            rows = [_as_float_tensor(w, "waveform") for w in waveforms]
            if any(r.ndim != 1 for r in rows):
                raise ValueError("each waveform in the list must be 1-D (mono samples); downmix stereo first")
        else:
            t = _as_float_tensor(waveforms, "waveforms")
            if t.ndim == 1:
                t = t[None]
            if t.ndim != 2:
                raise ValueError(f"waveforms must be (B, N) mono, got shape {tuple(t.shape)}; downmix stereo first")
            rows = list(t)
        if not rows:
            raise ValueError("no waveforms given")
        out = torch.zeros(len(rows), n)
        for i, r in enumerate(rows):
            if r.numel() == 0:
                raise ValueError(f"waveform {i} is empty; every clip needs at least one sample")
            m = min(n, r.numel())
            out[i, :m] = r[:m]
        return out

    def prepare_frames(self, frames: Any) -> torch.Tensor:
        """(B, T, 3, H, W) float in [0, 1] or uint8 -> checked float tensor (B, T, 3, S, S)."""
        t = _as_float_tensor(frames, "frames")
        c = self.config
        want = (c.num_frames, 3, c.image_size, c.image_size)
        if t.ndim == 4:
            t = t[None]
        if t.ndim != 5 or tuple(t.shape[1:]) != want:
            raise ValueError(
                f"frames must be (B, {', '.join(map(str, want))}) (T at {c.fps:g} fps, RGB, {c.image_size}px), got "
                f"{tuple(t.shape)}; decode with diffgap.core.video.load_frames(path, num_frames={c.num_frames}, size={c.image_size})"
            )
        return t

    # -- encoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _batched(self, fn, x: torch.Tensor) -> np.ndarray:
        outs = [fn(x[i : i + self.batch_size].to(self.device)).float().cpu() for i in range(0, len(x), self.batch_size)]
        return torch.cat(outs).numpy().astype(np.float32)

    def encode_video(self, frames: Any) -> np.ndarray:
        """frames (B, T, 3, H, W) in [0, 1] (or uint8) -> L2-normalised (B, 512) float32."""
        return self._batched(self.model.encode_video, self.prepare_frames(frames))

    def encode_audio(self, waveforms: Any) -> np.ndarray:
        """mono waveforms at ``config.sample_rate``, (B, N) or a list -> L2-normalised (B, 512) float32."""
        return self._batched(self.model.encode_audio, self.prepare_audio(waveforms))
