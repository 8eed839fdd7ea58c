"""The model and exports every group times.

Weights: a checkpoint if the user gives one, else a freshly initialised model of the preset whose
zero-initialised layers (adaLN-zero modulations, the final layer, the heads' residual MLPs -- zero at
init by design, see diffgap.models) are given random values of the same scale as their neighbours.
An untrained model times the same as a trained one (same graph, same shapes); without this step the
untrained denoiser outputs exact zeros, and a benchmark should not time an all-zero network.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
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


# The sources an export is made from: the model and sampler math, the contract modules, the
# exporter, and (full exports) the CLAP encoders and tokenizer.
_EXPORT_SOURCES = ("config.py", "models.py", "diffusion.py", "iospec.py", "manifest.py", "checkpoint.py",
                   "tokenizer.py", "audio.py", "encoders/clap.py")


def code_fingerprint() -> str:
    """sha256 over the python sources that shape an export."""
    import diffgap
    import diffgap.export

    h = hashlib.sha256()
    pkg = Path(diffgap.__file__).parent
    files = [pkg / f for f in _EXPORT_SOURCES] + sorted(Path(diffgap.export.__file__).parent.glob("*.py"))
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _export(ctx: Context, out: Path, steps: int, samplers_only: bool) -> Path:
    """``export_all`` at K = ``steps``: FP32 + FP16 graphs, the samplers with their guidance input (as
    `diffgap export` makes them). Encoders: laion-clap's HTSAT-tiny + transformer text tower (the real
    architecture, random weights) for the full run; the tiny variant with --quick.

    With ``ctx.cache`` set, an export made earlier from the same checkpoint weights, K, encoders and
    export code (sha256 of all three) is reused: exporting the K=50 sampler with its FP16 graph takes
    minutes on 2 cores, and export time is not what is measured here.
    """
    try:
        from diffgap.export import export_all
    except ImportError:
        from diffgap.export.cli import export_all
    from diffgap.checkpoint import WEIGHTS
    from diffgap.core.fsutil import sha256_file
    from diffgap.core.manifest import Manifest

    encoders = None if samplers_only else (ctx.encoders or ("tiny" if ctx.quick else "htsat-tiny"))
    if ctx.cache is not None:
        key = hashlib.sha256(
            f"{sha256_file(ctx.checkpoint / WEIGHTS)}|K={steps}|enc={encoders}|{code_fingerprint()}".encode()
        ).hexdigest()[:20]
        cached = ctx.cache / f"{ctx.preset}-k{steps}-{'samplers' if samplers_only else 'full'}-{key}"
        if (cached / "manifest.json").is_file():
            try:
                Manifest.load(cached, verify=True)
                log.info("reusing cached export %s (same checkpoint, K, encoders and export code)", cached)
                return cached
            except (ValueError, FileNotFoundError) as e:
                log.warning("cached export %s is unusable (%s); exporting again", cached, e)
                shutil.rmtree(cached, ignore_errors=True)
        ctx.cache.mkdir(parents=True, exist_ok=True)
        out = cached
    t0 = time.perf_counter()
    if samplers_only:
        _export_timed_sampler(ctx, out, steps)
    else:
        export_all(ctx.checkpoint, out, steps=steps, encoders=encoders)
    log.info("exported %s (K=%d, encoders %s) in %.1f s", out, steps, encoders, time.perf_counter() - t0)
    return out


# Above this K the benchmark export is FP32 only and the ORT FP16-graph row says so. Stock ModelOpt
# AutoCast's time and memory grow faster than linearly with K on the unrolled samplers;
# diffgap.export.fp16's linear-time passes (diffgap.export.modelopt_autocast_patch) convert every
# grid K, so every grid K gets FP16.
FP16_MAX_STEPS = 50


def _export_timed_sampler(ctx: Context, out: Path, steps: int) -> None:
    """The timed direction's fused sampler only (FP32 + FP16), with the export package's own building
    blocks (``FusedSampler``, ``export_module``, ``convert_fp16``) exactly as ``export_all`` calls them:
    the K x B grid times one direction, and the FP16 conversion of a K=50 graph takes many minutes on
    2 cores, so the other direction is not converted for nothing."""
    import torch

    from diffgap import __version__
    from diffgap.checkpoint import WEIGHTS
    from diffgap.export.calibration import CALIBRATION_BATCH, sampler_feeds
    from diffgap.export.fp16 import convert_fp16
    from diffgap.export.fused import FusedSampler
    from diffgap.export.onnx_export import export_module
    from diffgap.core.fsutil import atomic_dir, sha256_file
    from diffgap.core.manifest import Manifest, ModelEntry

    cfg = ctx.model.config
    sampler = FusedSampler(ctx.model, ctx.direction, steps)
    io = sampler.io_spec()
    ckpt_sha = sha256_file(ctx.checkpoint / WEIGHTS)
    files = {"fp32": f"{io.name}.onnx", "fp16": f"{io.name}.fp16.onnx"}
    gmeta = {"diffgap.preset": cfg.name, "diffgap.checkpoint_sha256": ckpt_sha, "diffgap.package_version": __version__,
             "diffgap.model": io.name, "diffgap.K": str(steps)}
    if steps > FP16_MAX_STEPS:
        del files["fp16"]
    with atomic_dir(out) as tmp, torch.no_grad():
        export_module(sampler, io, tmp / files["fp32"], metadata={**gmeta, "diffgap.precision": "fp32"})
        if "fp16" in files:
            convert_fp16(tmp / files["fp32"], tmp / files["fp16"], io, kind="denoiser",
                         calibration=sampler_feeds(io, CALIBRATION_BATCH, 1))
        man = Manifest(root=tmp, preset=cfg.name, embed_dim=cfg.embed_dim,
                       models={io.name: ModelEntry(io=io, files=files, meta=sampler.metadata())},
                       checkpoint_sha256=ckpt_sha, package_version=__version__,
                       extra={"note": "benchmark export: the timed direction's sampler only"})
        man.save()


def prepare(ctx: Context, groups: tuple[str, ...], export_dirs: list[Path] | None = None, checkpoint: Path | None = None) -> None:
    """Fill ``ctx.model``, ``ctx.checkpoint``, ``ctx.exports`` and ``ctx.main_export`` as ``groups`` need.

    ``export_dirs``: existing exports to reuse; each one's sampler K is read from its manifest, and the
    first one holding the encoders serves the encoder / pipeline / Triton groups.
    """
    from diffgap.core.manifest import Manifest

    for export_dir in export_dirs or []:
        man = Manifest.load(export_dir, verify=True)
        ctx.preset = man.preset or ctx.preset
        k = _export_steps(man, ctx.sampler_name)
        if k is not None:
            ctx.exports.setdefault(k, Path(export_dir))
        if ctx.main_export is None and "clap_text_encoder" in man.models:
            ctx.main_export, ctx.main_steps = Path(export_dir), k
    needs_main = bool(set(groups) & {"encoders", "pipeline", "triton", "search"}) and ctx.main_export is None
    grid = set(groups) & {"denoiser", "knobs"}
    missing = [k for k in ctx.steps if k not in ctx.exports] if grid else []
    if not (grid or needs_main or missing or "lean" in groups):  # lean exports the checkpoint itself
        return
    _load_model(ctx, checkpoint)
    if needs_main:
        # What `diffgap export` makes by default: the preset's K.
        k = int(ctx.model.config.diffusion.sample_steps)
        ctx.main_export = _export(ctx, ctx.work / f"export-main-k{k}", k, samplers_only=False)
        ctx.main_steps = k
        ctx.exports.setdefault(k, ctx.main_export)
    for k in missing:
        if k not in ctx.exports:
            ctx.exports[k] = _export(ctx, ctx.work / f"export-k{k}", k, samplers_only=True)


def _load_model(ctx: Context, checkpoint: Path | None) -> None:
    from diffgap.checkpoint import load_checkpoint, save_checkpoint

    if checkpoint is not None:
        ctx.model, _ = load_checkpoint(checkpoint)
        ctx.checkpoint = checkpoint
        ctx.preset = ctx.model.config.name
    else:
        ctx.model = random_model(ctx.preset)
        ctx.checkpoint = save_checkpoint(ctx.work / "checkpoint", ctx.model, meta={"note": "benchmark: random weights"})


def _export_steps(man, sampler: str) -> int | None:
    """K of the export's sampler (manifest meta ``steps``), or None when it records none."""
    if sampler not in man.models:
        return None
    meta = {**man.model(sampler).io.meta, **man.model(sampler).meta}
    return int(meta["steps"]) if "steps" in meta else None
