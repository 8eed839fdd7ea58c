"""DiffGAP as the conditioning prior of a CLAP-conditioned generator: K-step bridge samples in the
generator's own (raw CLAP / CAVP) embedding space.

A generator such as AudioLDM or MusicLDM was trained conditioned on CLAP *audio* embeddings and is
prompted with CLAP *text* embeddings. The bridge replaces the text embedding by N samples of the
audio embedding given the text: K DDIM steps from seeded noise (:mod:`diffgap.core.generation`),
with classifier-free guidance, in head space, then mapped back to the raw space exactly.

The map back (:class:`HeadInverse`): the target modality's head is ``h = normalize(W x + b)`` (linear
heads, the default; ``W`` square when the head dimension equals the embedding dimension). Raw CLAP
embeddings have unit norm, which fixes the scale the normalisation dropped: with ``u = W^-1 h`` and
``v = W^-1 b``, ``x = s u - v`` where ``s > 0`` solves ``|s u - v| = 1``. The root is unique when
``|v| < 1`` (the product of the roots is ``|v|^2 - 1 < 0``), and the map inverts the head exactly on
every unit vector, so a bridge sample lands where a real embedding with that head image would be.
The same module is exported as one fused ONNX graph (export/generation.py).

The generator side (:func:`load_generator`, :func:`run_generator`, :func:`generate`) is in
:mod:`diffgap.generation_pipeline`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .core.errors import UserError
from .core.names import META_ENCODER
from .core.generation import GEN_GUIDANCE, GEN_STEPS, generation_noise
from .models import DiffGAP, parse_direction

log = logging.getLogger(__name__)

ENCODER_META = META_ENCODER  # checkpoint meta key: the frozen encoder the embeddings came from


def check_invertible(model: DiffGAP, modality: str | None = None) -> None:
    """A one-line :class:`UserError` unless ``modality``'s head (default: every head) can be inverted exactly
    (see the module docstring)."""
    cfg = model.config
    if cfg.heads.hidden != 0:
        raise UserError(f"checkpoint preset {cfg.name!r} has MLP heads (heads.hidden = {cfg.heads.hidden}); generation maps "
                        "bridge samples back through linear heads: train with heads.hidden = 0 (the clap-512 / cavp-512 default)")
    for m in (cfg.modalities if modality is None else (modality,)):
        if cfg.heads.dim != cfg.input_dim(m):
            raise UserError(f"checkpoint preset {cfg.name!r} has {cfg.heads.dim}-d heads on {cfg.input_dim(m)}-d {m} embeddings; "
                            "generation needs square heads (heads.dim == the embedding width) to map samples back: "
                            "train with clap-512 / cavp-512 on 512-d embeddings")


class HeadInverse(nn.Module):
    """Head-space unit vectors (B, D) of ``modality`` -> the unit raw embeddings (B, E) they are the head image of."""

    def __init__(self, model: DiffGAP, modality: str):
        super().__init__()
        check_invertible(model, modality)
        lin = model.heads.heads[modality].linear
        W = lin.weight.detach().double()                    # (D, E), D == E
        b = lin.bias.detach().double()
        try:
            W_inv = torch.linalg.inv(W)                     # (E, D)
        except RuntimeError as e:  # torch raises on an exactly singular matrix
            raise UserError(f"the {modality} head of this checkpoint is singular ({e}); it cannot be inverted for generation") from None
        v = W_inv @ b                                       # (E,)
        if float(v.norm()) >= 1.0:
            raise UserError(f"the {modality} head's bias is too large to invert exactly (|W^-1 b| = {float(v.norm()):.3f} >= 1); "
                            "this checkpoint cannot condition a generator")
        self.register_buffer("w_inv_t", W_inv.T.float().contiguous())  # (D, E): h @ W^-1^T
        self.register_buffer("v", v.float())
        self.register_buffer("v_sq_minus_1", (v @ v - 1.0).float().reshape(()))
        self.modality = modality

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, D) unit norm -> (B, E) unit norm
        u = h @ self.w_inv_t                                # (B, E)
        a = (u * u).sum(-1, keepdim=True)                   # |u|^2
        uv = u @ self.v[:, None]                            # (B, 1) u . v
        s = (uv + torch.sqrt(uv * uv - a * self.v_sq_minus_1)) / a
        return F.normalize(s * u - self.v, dim=-1)          # unit norm already; normalize absorbs rounding


class RawSpaceBridge(nn.Module):
    """``forward(condition (B, E), noise (B, D)[, guidance_scale (B, 1)]) -> (B, E)``: K DDIM steps from
    ``noise`` (eta = 0, deterministic given the noise) with classifier-free guidance, mapped to raw space."""

    def __init__(self, model: DiffGAP, direction: str | None = None, steps: int = GEN_STEPS, guidance: bool = True):
        super().__init__()
        cfg = model.config
        direction = cfg.directions[0] if direction is None else direction
        if direction not in cfg.directions:
            raise ValueError(f"direction {direction!r} not in this model; it has {list(cfg.directions)}")
        T = model.schedule.T
        if not 1 <= int(steps) <= T:
            raise UserError(f"--steps {steps} is invalid: use 1 <= K <= {T}")
        self.model = model.eval()
        self.direction = direction
        self.target, self.source = parse_direction(direction)
        self.steps = int(steps)
        self.guidance = bool(guidance)
        self.inverse = HeadInverse(model, self.target)

    def forward(self, condition: torch.Tensor, noise: torch.Tensor, guidance_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        if guidance_scale is None:
            if self.guidance and torch.jit.is_tracing():
                raise ValueError("a traced RawSpaceBridge with guidance needs guidance_scale (B, 1)")
            guidance_scale = GEN_GUIDANCE
        h = self.model.bridge(self.direction, condition, noise, steps=self.steps,
                              guidance_scale=guidance_scale if self.guidance else 1.0, mode="noise", eta=0.0)
        return self.inverse(h)


def resolve_model(model_or_checkpoint: DiffGAP | str | Path) -> tuple[DiffGAP, dict[str, Any]]:
    """A loaded model (meta {}) or a checkpoint directory -> (model, checkpoint meta)."""
    if isinstance(model_or_checkpoint, DiffGAP):
        return model_or_checkpoint.eval(), {}
    from .checkpoint import load_checkpoint

    return load_checkpoint(model_or_checkpoint)


@torch.no_grad()
def sample_conditions(
    model: DiffGAP | str | Path,
    condition: np.ndarray,                        # (B, E) frozen source embeddings
    n: int = 1,
    seeds: int | Sequence[int] | np.ndarray = 0,  # one per row, or one int s: row b gets s + b
    steps: int = GEN_STEPS,
    guidance_scale: float = GEN_GUIDANCE,
    direction: str | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """N seeded K-step bridge samples per row in the raw target space: (B, N, E) float32, unit norm.

    Sample j of row b starts from row j of ``default_rng(seed_b).standard_normal((n, D))``
    (:func:`diffgap.core.generation.generation_noise`), so the torch-free runtime draws the same noise.
    """
    model, _ = resolve_model(model)
    bridge = RawSpaceBridge(model, direction, steps)
    cond = np.asarray(condition, dtype=np.float32)
    E, D, E_out = model.config.input_dim(bridge.source), model.config.heads.dim, model.config.input_dim(bridge.target)
    if cond.ndim != 2 or cond.shape[1] != E:
        raise UserError(f"condition must be (B, {E}) {bridge.source} embeddings of this checkpoint's space, got shape {cond.shape}")
    B = len(cond)
    noise = generation_noise(seeds, B, n, D).reshape(B * n, D)
    rows = np.repeat(cond, n, axis=0)                                   # (B*N, E): row b*N + j
    out = np.empty((B * n, E_out), np.float32)
    g = torch.tensor([[float(guidance_scale)]])
    for i in range(0, B * n, batch_size):
        c = torch.from_numpy(rows[i:i + batch_size])
        out[i:i + batch_size] = bridge(c, torch.from_numpy(noise[i:i + batch_size]), g.expand(len(c), 1)).numpy()
    return out.reshape(B, n, E_out)


def check_encoder(meta: dict[str, Any], encoder: dict[str, Any] | None, any_encoder: bool = False) -> None:
    """Refuse to condition a generator whose CLAP is not the one the checkpoint was trained on.

    ``meta``: checkpoint meta; ``encoder``: the generator's encoder identity
    (:func:`diffgap.encoders.hf_clap.fingerprint`). ``any_encoder`` skips the check (an explicit choice).
    """
    if any_encoder:
        return
    trained = meta.get(ENCODER_META)
    if not trained:
        raise UserError("the checkpoint records no CLAP fingerprint (it was not trained on `diffgap embed --hf-clap` embeddings); "
                        "retrain on embeddings from the generator's CLAP, or pass --any-clap to generate anyway")
    if encoder is None or trained.get("fingerprint") != encoder.get("fingerprint"):
        got = None if encoder is None else encoder.get("fingerprint")
        raise UserError(f"the checkpoint was trained on CLAP {str(trained.get('fingerprint'))[:12]} ({trained.get('source')}) but the "
                        f"generator's CLAP is {str(got)[:12]}; embed with the generator's CLAP (`diffgap embed --hf-clap GENERATOR_DIR`) "
                        "and retrain, or pass --any-clap")
