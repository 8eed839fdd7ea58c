"""The model and exports every group times.

Weights: a checkpoint if the user gives one, else a freshly initialised model of the preset whose
zero-initialised layers (adaLN-zero modulations, the final layer, the heads' residual MLPs -- zero at
init by design, see diffgap.models) are given random values of the same scale as their neighbours.
An untrained model times the same as a trained one (same graph, same shapes); without this step the
untrained denoiser outputs exact zeros, and a benchmark should not time an all-zero network.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .context import Context

log = logging.getLogger("benchmarks.prepare")


def random_model(preset: str, seed: int = 0):
    import torch

    from diffgap.config import get_preset
    from diffgap.models import DiffGAP

    torch.manual_seed(seed)
    model = DiffGAP(get_preset(preset)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().max() == 0:  # zero-initialised by design: give it a trained-like scale
                if p.ndim == 2:
                    p.normal_(0.0, 0.02)
                elif p.ndim == 1:
                    p.normal_(0.0, 0.01)
    return model


def _export(checkpoint: Path, out: Path, steps: int, samplers_only: bool) -> Path:
    from diffgap.export import export_all

    t0 = time.perf_counter()
    kw: dict[str, Any] = {"steps": steps}
    if samplers_only:
        kw["encoders"] = False
    export_all(checkpoint, out, **kw)
    log.info("exported %s (K=%d%s) in %.1f s", out, steps, ", samplers only" if samplers_only else "", time.perf_counter() - t0)
    return out


def prepare(ctx: Context, groups: tuple[str, ...], export_dir: Path | None = None, checkpoint: Path | None = None) -> None:
    """Fill ``ctx.model``, ``ctx.checkpoint``, ``ctx.exports`` and ``ctx.main_export``."""
    from diffgap.checkpoint import load_checkpoint, save_checkpoint
    from diffgap.manifest import Manifest

    preset = ctx.preset
    if export_dir is not None:
        man = Manifest.load(export_dir, verify=True)
        preset = man.preset or preset
        ctx.preset = preset
    if checkpoint is not None:
        ctx.model, _ = load_checkpoint(checkpoint)
        ctx.checkpoint = checkpoint
        ctx.preset = ctx.model.config.name
    else:
        ctx.model = random_model(preset)
        ctx.checkpoint = save_checkpoint(ctx.work / "checkpoint", ctx.model, meta={"note": "benchmark: random weights"})

    if export_dir is not None:
        ctx.main_export = Path(export_dir)
        ctx.main_steps = _export_steps(Manifest.load(export_dir), ctx.sampler_name)
        ctx.exports[ctx.main_steps] = ctx.main_export
    needs_main = set(groups) & {"encoders", "pipeline", "triton"}
    if needs_main and ctx.main_export is None:
        # What `diffgap export` makes by default: the preset's K.
        k = int(ctx.model.config.diffusion.sample_steps)
        ctx.main_export = _export(ctx.checkpoint, ctx.work / f"export-main-k{k}", k, samplers_only=False)
        ctx.main_steps = k
        ctx.exports.setdefault(k, ctx.main_export)
    if set(groups) & {"denoiser", "knobs"}:
        for k in ctx.steps:
            if k not in ctx.exports:
                ctx.exports[k] = _export(ctx.checkpoint, ctx.work / f"export-k{k}", k, samplers_only=True)


def _export_steps(man, sampler: str) -> int:
    meta = man.model(sampler).meta
    for key in ("steps", "K", "sample_steps", "num_steps"):
        if key in meta:
            return int(meta[key])
    raise ValueError(f"{man.root}: {sampler} records no step count K in its manifest meta; re-export with this diffgap version")
