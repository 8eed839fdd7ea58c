"""The fused generation sampler: K DDIM steps with guidance, then the exact map back to raw space.

:class:`GenerationSampler` wraps :class:`diffgap.generation.RawSpaceBridge` -- the retrieval
sampler's graph (:mod:`diffgap.export.fused`: heads, standardisation, the unrolled K steps with
stacked guidance, renormalisation) followed by the inverse of the target's linear head -- as one
exportable module ``<source>_to_<target>_condition_sampler``. Its output is what a CLAP-conditioned
generator takes as its condition (``prompt_embeds``). Its I/O declaration:

* ``condition (B, E) float32`` -- the frozen embedding of the *source* modality;
* ``noise (B, D) float32`` -- the caller's Gaussian draw: N samples of one caption are N rows with the
  condition repeated (:func:`diffgap.core.generation.generation_noise` draws them from seeds);
* ``guidance_scale (B, 1) float32`` -- classifier-free guidance per row, optional (the exported default);
* ``raw_embedding (B, E) float32`` -- the bridged target sample in the raw space, unit norm.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffgap.core.generation import GEN_GUIDANCE, GEN_STEPS
from diffgap.core.iospec import (
    BATCH, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_RAW_SAMPLE, ROLES, SAMPLER_BATCH_PROFILE, BatchProfile, IOSpec,
    TensorSpec,
)
from diffgap.core.names import condition_sampler_name
from diffgap.diffusion import DDIMSampler, timesteps_summary
from diffgap.generation import RawSpaceBridge


class GenerationSampler(nn.Module):
    """``forward(condition (B, E), noise (B, D)[, guidance_scale (B, 1)]) -> raw_embedding (B, E)``."""

    def __init__(self, model: nn.Module, direction: str | None = None, steps: int = GEN_STEPS, *,
                 guidance: bool = True, default_guidance: float = GEN_GUIDANCE,
                 batch: BatchProfile = SAMPLER_BATCH_PROFILE, encoder: dict | None = None) -> None:
        super().__init__()
        self.bridge = RawSpaceBridge(model, direction, steps, guidance=guidance)
        self.model = model
        self.direction = self.bridge.direction
        self.steps = self.bridge.steps
        self.guidance = bool(guidance)
        self.default_guidance = float(default_guidance)
        self.batch = batch
        self.encoder = encoder
        self.timesteps = DDIMSampler(model.schedule).set_timesteps(self.steps)

    @property
    def name(self) -> str:
        return condition_sampler_name(self.bridge.source, self.bridge.target)

    def io_spec(self) -> IOSpec:
        cfg = self.model.config
        src, tgt = self.bridge.source, self.bridge.target
        E, D, E_out = cfg.input_dim(src), cfg.heads.dim, cfg.input_dim(tgt)
        condition = TensorSpec("condition", "float32", (BATCH, E), doc=f"frozen {src} embedding (CLAP/CAVP space)")
        noise = TensorSpec("noise", "float32", (BATCH, D), doc="initial Gaussian noise N(0, I), one row per sample")
        raw = TensorSpec("raw_embedding", "float32", (BATCH, E_out),
                         doc=f"bridged {tgt} sample in the raw {src}/{tgt} encoder space, unit norm (the generator's condition)")
        roles = {ROLE_CONDITION: condition, ROLE_NOISE: noise, ROLE_RAW_SAMPLE: raw}
        inputs = [condition, noise]
        if self.guidance:
            g = TensorSpec("guidance_scale", "float32", (BATCH, 1), optional=True, default=self.default_guidance,
                           low=0.0, high=8.0, doc="classifier-free guidance scale per row (1 = conditional only)")
            inputs.append(g)
            roles[ROLE_GUIDANCE] = g
        return IOSpec(name=self.name, inputs=tuple(inputs), outputs=(raw,),
                      min_batch=self.batch[0], opt_batch=self.batch[1], max_batch=self.batch[2],
                      meta={**self.metadata(), ROLES: {r: t.name for r, t in roles.items()}})

    def metadata(self) -> dict[str, Any]:
        cfg = self.model.config
        d = cfg.diffusion
        return {
            "direction": self.direction, "source": self.bridge.source, "target": self.bridge.target,
            "output_space": "raw", "steps": self.steps, "timesteps": timesteps_summary(self.timesteps),
            "bridge_mode": "noise", "start_timestep": self.timesteps[0], "schedule": d.schedule,
            "num_train_timesteps": d.num_train_timesteps, "prediction": d.prediction, "eta": 0.0,
            "guidance_input": self.guidance, "default_guidance_scale": self.default_guidance,
            "embed_dim": cfg.input_dim(self.bridge.target), "head_dim": cfg.heads.dim, "preset": cfg.name,
            "encoder": self.encoder,
        }

    def forward(self, condition: torch.Tensor, noise: torch.Tensor, guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance and guidance_scale is None:
            raise ValueError(f"{self.name} was built with a guidance_scale input; pass guidance_scale (B, 1)")
        return self.bridge(condition, noise, guidance_scale if self.guidance else None)
