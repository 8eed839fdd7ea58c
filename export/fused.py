"""The fused fixed-step sampler: one exportable module per bridging direction.

:class:`FusedSampler` wraps :meth:`diffgap.models.DiffGAP.bridge` -- contrastive heads on the
condition, standardisation, the K DDIM steps (a Python loop over constant timesteps, so tracing
unrolls it into one straight-line graph with every schedule coefficient baked in as a constant),
x0 renormalisation, un-standardisation and the final L2 normalisation. With guidance, each step's
conditional and unconditional denoiser calls are one stacked (2B, .) pass
(:meth:`~diffgap.models.ConditionalDenoiser.forward_guided`): each weight is read once per step, and
the unconditional branch's adaLN modulations depend only on the (constant) timestep, so export folds
them into constants (``python -m benchmarks`` times the fused sampler). Its I/O declaration:

* ``condition (B, E) float32`` -- the frozen embedding of the *source* modality (E: its width);
* ``noise (B, D) float32`` -- the caller's Gaussian draw (reproducible results; the graph holds no RNG);
* ``guidance_scale (B, 1) float32`` -- classifier-free guidance per row, optional (the runtime fills
  the exported default); absent when exported with ``guidance=False`` (conditional branch only,
  half the graph);
* ``embedding (B, D) float32`` -- the bridged, L2-normalised head-space embedding of the *target*;
* ``source_embedding (B, D) float32`` -- the condition's own L2-normalised head-space embedding
  (``model.project(source, condition)``), which the runtime's fused search scores need.

The sampler runs DDIM with eta = 0 (deterministic given ``noise``); the bridge mode ("noise": start
from N(0, I) at t = T-1; "source": SDEdit-style start from the noised source at t0) is fixed at
export and recorded, with K, the timesteps and the schedule, in the graph's metadata.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffgap.core.errors import UserError
from diffgap.core.iospec import (
    BATCH, ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_PROJECTED, ROLES, SAMPLER_BATCH_PROFILE,
    BatchProfile, IOSpec, TensorSpec,
)
from diffgap.core.names import head_name, parse_sampler_name, sampler_name
from diffgap.diffusion import DDIMSampler, timestep_start, timesteps_summary
from diffgap.models import parse_direction


def export_name(direction: str) -> str:
    """``"audio_given_text"`` -> ``"diffgap_text_to_audio"`` (the fixed export names)."""
    target, source = parse_direction(direction)
    return sampler_name(source, target)


def direction_of(name: str) -> str:
    """Inverse of :func:`export_name`."""
    source, target = parse_sampler_name(name)
    return f"{target}_given_{source}"


class FusedSampler(nn.Module):
    """``forward(condition (B, E), noise (B, D)[, guidance_scale (B, 1)]) -> (embedding (B, D), source_embedding (B, D))``."""

    def __init__(
        self,
        model: nn.Module,
        direction: str,
        steps: int | None = None,
        *,
        guidance: bool = True,
        mode: str | None = None,
        t0: float | None = None,
        batch: BatchProfile = SAMPLER_BATCH_PROFILE,
    ) -> None:
        super().__init__()
        cfg = model.config
        if direction not in cfg.directions:
            raise ValueError(f"direction {direction!r} not in this model; it has {list(cfg.directions)}")
        dcfg = cfg.diffusion
        self.model = model.eval()
        self.direction = direction
        self.steps = int(dcfg.sample_steps if steps is None else steps)
        self.mode = dcfg.bridge_mode if mode is None else mode
        if self.mode not in ("noise", "source"):
            raise ValueError(f"bridge mode {self.mode!r} unknown; use 'noise' or 'source'")
        self.t0 = float(dcfg.bridge_t0 if t0 is None else t0)
        self.guidance = bool(guidance)
        self.default_guidance = float(dcfg.guidance_scale)
        self.batch = batch
        T = model.schedule.T
        self.start = T - 1 if self.mode == "noise" else timestep_start(T, self.t0)
        if not 1 <= self.steps <= self.start + 1:
            where = "T" if self.mode == "noise" else f"the bridge start t0*T = {self.start + 1}"
            raise UserError(
                f"--steps {self.steps} is invalid for bridge mode {self.mode!r}: use 1 <= K <= {self.start + 1} ({where})"
            )
        sampler = DDIMSampler(model.schedule)
        self.timesteps = sampler.set_timesteps(self.steps, start=self.start)

    @property
    def name(self) -> str:
        return export_name(self.direction)

    def io_spec(self) -> IOSpec:
        cfg = self.model.config
        target, source = parse_direction(self.direction)
        E, D = cfg.input_dim(source), cfg.heads.dim
        # Every tensor name is typed here once; meta["roles"] maps each role to it so the runtime,
        # Triton and checks look tensors up by role (IOSpec.role), never by a retyped name.
        condition = TensorSpec("condition", "float32", (BATCH, E), doc=f"frozen {source} embedding (CLAP/CAVP space)")
        noise = TensorSpec("noise", "float32", (BATCH, D), doc="initial Gaussian noise N(0, I), caller-provided")
        bridged = TensorSpec("embedding", "float32", (BATCH, D), doc=f"bridged L2-normalised {target} head-space embedding")
        # The runtime's search scores (raw, head-space and both bridged similarities) need the query's
        # own head-space embedding too; the graph computes it anyway.
        projected = TensorSpec("source_embedding", "float32", (BATCH, D),
                               doc=f"the condition's own L2-normalised {source} head-space embedding (model.project)")
        roles = {ROLE_CONDITION: condition, ROLE_NOISE: noise, ROLE_BRIDGED: bridged, ROLE_PROJECTED: projected}
        inputs = [condition, noise]
        if self.guidance:
            guidance = TensorSpec(
                "guidance_scale", "float32", (BATCH, 1), optional=True, default=self.default_guidance,
                low=0.0, high=8.0,
                doc="classifier-free guidance scale per row (1 = conditional only)",
            )
            inputs.append(guidance)
            roles[ROLE_GUIDANCE] = guidance
        return IOSpec(
            name=self.name,
            inputs=tuple(inputs),
            outputs=(bridged, projected),
            min_batch=self.batch[0], opt_batch=self.batch[1], max_batch=self.batch[2],
            meta={**self.metadata(), ROLES: {role: t.name for role, t in roles.items()}},
        )

    def metadata(self) -> dict[str, Any]:
        """What is baked into the graph (also recorded in ONNX metadata_props and manifest.json)."""
        cfg = self.model.config
        target, source = parse_direction(self.direction)
        d = cfg.diffusion
        return {
            "direction": self.direction,
            "source": source,
            "target": target,
            "steps": self.steps,
            "timesteps": timesteps_summary(self.timesteps),
            "bridge_mode": self.mode,
            "bridge_t0": self.t0 if self.mode == "source" else None,
            "start_timestep": self.start,
            "schedule": d.schedule,
            "num_train_timesteps": d.num_train_timesteps,
            "prediction": d.prediction,
            "eta": 0.0,
            "guidance_input": self.guidance,
            "default_guidance_scale": self.default_guidance,
            "embed_dim": cfg.input_dim(source),
            "head_dim": cfg.heads.dim,
            "preset": cfg.name,
        }

    def forward(self, condition: torch.Tensor, noise: torch.Tensor, guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance and guidance_scale is None:
            raise ValueError(f"{self.name} was built with a guidance_scale input; pass guidance_scale (B, 1)")
        g = guidance_scale if self.guidance else 1.0
        bridged = self.model.bridge(
            self.direction, condition, noise, steps=self.steps, guidance_scale=g, mode=self.mode, t0=self.t0, eta=0.0,
        )
        _, source = parse_direction(self.direction)
        return bridged, self.model.project(source, condition)


class ProjectionHead(nn.Module):
    """``forward(condition (B, E)) -> source_embedding (B, D)``: one modality's contrastive head alone.

    The same ``model.project`` the fused sampler's ``source_embedding`` output computes, without the K
    denoiser steps: where the fusion weights give both bridged terms weight 0, a query or gallery item
    needs only this (:mod:`diffgap.runtime.fusion`).
    """

    def __init__(self, model: nn.Module, modality: str, batch: BatchProfile = SAMPLER_BATCH_PROFILE) -> None:
        super().__init__()
        if modality not in model.config.modalities:
            raise ValueError(f"modality {modality!r} not in this model; it has {list(model.config.modalities)}")
        self.model = model.eval()
        self.modality = modality
        self.batch = batch

    @property
    def name(self) -> str:
        return head_name(self.modality)

    def io_spec(self) -> IOSpec:
        cfg = self.model.config
        m = self.modality
        condition = TensorSpec("condition", "float32", (BATCH, cfg.input_dim(m)), doc=f"frozen {m} embedding")
        projected = TensorSpec("source_embedding", "float32", (BATCH, cfg.heads.dim),
                               doc=f"the condition's own L2-normalised {m} head-space embedding (model.project)")
        return IOSpec(
            name=self.name, inputs=(condition,), outputs=(projected,),
            min_batch=self.batch[0], opt_batch=self.batch[1], max_batch=self.batch[2],
            meta={**self.metadata(), ROLES: {ROLE_CONDITION: condition.name, ROLE_PROJECTED: projected.name}},
        )

    def metadata(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"modality": self.modality, "embed_dim": cfg.input_dim(self.modality), "head_dim": cfg.heads.dim, "preset": cfg.name}

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.model.project(self.modality, condition)
