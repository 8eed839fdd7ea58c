"""``diffgap export`` as a plan and a run.

:func:`plan_export` validates the arguments (fast, before anything heavy), loads the checkpoint and
the encoders and lists one :class:`ExportJob` per model: its module, FP16 rules, parity kind and the
realistic inputs used for FP16 calibration and parity (:mod:`diffgap.export.calibration`).
:func:`run_export` writes the graphs, FP16 graphs, lint and parity reports and the manifest into a
temporary sibling of the export directory and renames it at the end, so a failure leaves nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffgap.core.errors import UserError

log = logging.getLogger(__name__)

HELP = "export a checkpoint to ONNX (CLAP or CAVP encoders + fused K-step samplers, FP32 + FP16) with a manifest"
ENCODER_ARCHS = ("tiny", "htsat-tiny")
CAVP_ENCODER_CONFIGS = ("tiny", "full")   # diffgap.encoders.cavp.CAVP_CONFIGS (random weights)
# sorted checkpoint modalities -> the contrastive encoders whose space the denoisers bridge
ENCODER_FAMILIES = {("audio", "text"): "clap", ("audio", "video"): "cavp"}



class ExportCheckError(ValueError):
    """``--check`` found a parity figure outside its bound; ``.table`` holds the parity table."""

    def __init__(self, message: str, table: str = "") -> None:
        super().__init__(message)
        self.table = table


@dataclass
class ExportResult:
    """What :func:`export_all` wrote and measured."""

    out: Path
    manifest: Any                                  # diffgap.core.manifest.Manifest (root = out)
    lint: dict[str, dict] = field(default_factory=dict)
    parity: dict | None = None                     # check.summarize(...) when check=True
    table: str | None = None                       # check.format_table(...) when check=True
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# validation helpers (fast, before anything heavy runs)
# ---------------------------------------------------------------------------------------------
def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite or choose another --out")
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"cannot create --out {out}: {anc} is a file, not a directory; choose another --out")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write under {anc} (permission denied); choose a writable --out")


def _check_steps(steps: int | None, T: int) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UserError(f"--steps must be an integer, got {steps!r}")
    if steps < 1 or steps > T:
        raise UserError(f"--steps {steps} is out of range: use 1 <= K <= T = {T} (the schedule's training timesteps)")


def _cavp_encoder(encoders: str | os.PathLike, seed: int):
    """``tiny``/``full`` (random weights) or a Diff-Foley CAVP checkpoint path (full architecture)."""
    from diffgap.encoders.cavp import CavpEncoder

    src = str(encoders)
    if src in CAVP_ENCODER_CONFIGS:
        log.warning("exporting the %r CAVP architecture with random weights (demo/test use); pass --encoders PATH "
                    "to a Diff-Foley CAVP checkpoint for real embeddings", src)
        return CavpEncoder.from_config(src, seed=seed), f"random-init:{src}"
    p = Path(src)
    if not p.is_file():
        raise FileNotFoundError(
            f"--encoders {src!r} is neither one of {CAVP_ENCODER_CONFIGS} nor an existing Diff-Foley CAVP checkpoint file"
        )
    return CavpEncoder.from_checkpoint(p, config="full"), f"checkpoint:{p.name}"


def _clap_encoder(encoders: str | os.PathLike, roberta_dir, seed: int, cfg):
    """``tiny``/``htsat-tiny`` (random weights) or a LAION-CLAP checkpoint path."""
    from diffgap.encoders.clap import EMBED_DIM, ClapEncoder

    if tuple(sorted(cfg.modalities)) != ("audio", "text"):
        raise UserError(
            f"checkpoint preset {cfg.name!r} bridges {cfg.modalities}, not text<->audio: CLAP encoders do not "
            "apply; pass --encoders none or a CLAP-space checkpoint"
        )
    if set(cfg.input_dims.values()) != {EMBED_DIM}:
        raise UserError(
            f"checkpoint {cfg.name!r} takes embeddings of widths {cfg.input_dims} but CLAP encoders output "
            f"{EMBED_DIM}-d; pass a checkpoint trained on CLAP embeddings, or --encoders none (samplers only)"
        )
    src = str(encoders)
    if src in ENCODER_ARCHS:
        log.warning("exporting the offline %r CLAP architecture with random weights (demo/test use); "
                    "pass --encoders PATH to a LAION-CLAP checkpoint for real embeddings", src)
        return ClapEncoder.from_arch(src, seed=seed)
    p = Path(src)
    if not p.is_file():
        raise FileNotFoundError(
            f"--encoders {src!r} is neither one of {ENCODER_ARCHS} nor an existing LAION-CLAP checkpoint file"
        )
    return ClapEncoder.from_checkpoint(p, roberta_dir=roberta_dir)


# ---------------------------------------------------------------------------------------------
# the plan: what to export, with which rules and inputs (validated before anything heavy runs)
# ---------------------------------------------------------------------------------------------
Feeds = Callable[[int, int], dict]  # (batch, seed) -> realistic feeds (diffgap.export.calibration)


@dataclass
class ExportJob:
    """One exported model: its module, FP16 rules, parity kind and the inputs a user sends it."""

    module: Any                     # an nn.Module with io_spec()
    fp16_kind: str                  # diffgap.export.fp16.convert_fp16's kind
    check_kind: str                 # "encoder" | "denoiser" (diffgap.export.check bounds)
    fp16_backend: str               # "reference" (onnx.reference FP16 arithmetic) | "ort" (ORT CPU)
    feeds: Feeds                    # FP16 calibration inputs (and parity inputs unless parity_feeds is set)
    meta: dict                      # the manifest entry's meta (also written as ONNX metadata)
    parity_feeds: Feeds | None = None


@dataclass
class ExportPlan:
    """Everything :func:`run_export` needs; built by :func:`plan_export`."""

    checkpoint: Path
    out: Path
    overwrite: bool
    config: Any                     # diffgap.config.ModelConfig of the checkpoint
    checkpoint_meta: dict
    checkpoint_sha256: str
    family: str | None              # "clap" | "cavp" | None (no encoders)
    encoder: Any                    # ClapEncoder | CavpEncoder | None
    jobs: list[ExportJob]
    opset: int
    fp16: bool
    check: bool
    fusion_weights: dict[str, dict[str, float]] | None = None


def _encoder_jobs(family: str, enc, source: str) -> tuple[list[ExportJob], dict[str, Feeds]]:
    """The encoder jobs and, per modality, a function embedding that modality's calibration inputs."""
    import torch

    from . import calibration as cal

    def embed(module, feeds_fn: Feeds) -> Feeds:
        def conditions(batch: int, seed: int):
            with torch.no_grad():
                return module(*(torch.from_numpy(v) for v in feeds_fn(batch, seed).values())).numpy()
        return conditions

    def one_input(module, make):  # (batch, seed) -> {the module's single input: make(batch, seed)}
        return lambda b, seed: cal.single_input(module.io_spec(), make(b, seed))

    if family == "cavp":
        c = enc.config
        meta = {"encoder": source, "cavp_config": c.name}
        video = one_input(enc.video_module, lambda b, seed: cal.frames(b, c.num_frames, c.image_size, seed))
        audio = one_input(enc.audio_module, lambda b, seed: cal.clips(b, c.clip_samples, c.sample_rate, seed))
        # Both CAVP towers' FP16 parity runs on ORT CPU: the reference evaluator's numpy 3-D/2-D
        # convolutions take far too long at full size (ResNet3D-50 on 16 x 224 x 224 frames).
        jobs = [ExportJob(enc.video_module, "video_encoder", "encoder", "ort", video, meta),
                ExportJob(enc.audio_module, "cavp_audio_encoder", "encoder", "ort", audio, meta)]
        return jobs, {"video": embed(enc.video_module, video), "audio": embed(enc.audio_module, audio)}
    from diffgap.encoders.clap import CLIP_SAMPLES, SAMPLE_RATE

    meta = {"encoder": source, "clap_arch": enc.arch.name, "tokenizer": enc.tokenizer.kind}
    text = lambda b, seed: enc.tokenize(cal.captions(b, seed))  # noqa: E731
    audio = one_input(enc.audio_module, lambda b, seed: cal.clips(b, CLIP_SAMPLES, SAMPLE_RATE, seed, int16=True))
    # The audio tower's FP16 parity runs on ORT CPU (see diffgap.export.check for what that measures).
    jobs = [ExportJob(enc.text_module, "text_encoder", "encoder", "reference", text, meta),
            ExportJob(enc.audio_module, "audio_encoder", "encoder", "ort", audio, meta)]
    return jobs, {"text": embed(enc.text_module, text), "audio": embed(enc.audio_module, audio)}


def _sampler_job(sampler, conditions: Feeds | None) -> ExportJob:
    """A fused sampler: calibrated at its exported default guidance scale, parity also at 3 (the guided branch)."""
    from . import calibration as cal

    io = sampler.io_spec()
    default = sampler.default_guidance

    def feeds(b: int, seed: int) -> dict:
        return cal.sampler_feeds(io, b, seed, conditions)

    def parity(b: int, seed: int) -> dict:
        return cal.sampler_feeds(io, b, seed, conditions, guidance=(default, 3.0))

    return ExportJob(sampler, "denoiser", "denoiser", "reference", feeds, sampler.metadata(), parity)


def _head_job(head, conditions: Feeds | None) -> ExportJob:
    """One modality's contrastive head alone (what a query needs where the bridged terms weigh 0)."""
    from diffgap.core.iospec import ROLE_CONDITION

    from . import calibration as cal

    spec = head.io_spec().role(ROLE_CONDITION)

    def feeds(b: int, seed: int) -> dict:
        c = conditions(b, seed) if conditions is not None else np.random.default_rng(seed).standard_normal(spec.concrete(b))
        return {spec.name: cal.unit_rows(np.asarray(c, np.float64))}

    return ExportJob(head, "denoiser", "encoder", "reference", feeds, head.metadata())


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how (every setting of ``diffgap export`` but the checkpoint and ``--out``).

    steps: K for the fused samplers (default: the checkpoint's ``diffusion.sample_steps``).
    bridge_mode: ``"source"`` | ``"noise"`` (default: the checkpoint's).
    encoders: text<->audio checkpoints: ``"tiny"`` | ``"htsat-tiny"`` | path of a LAION-CLAP checkpoint;
        video<->audio (``cavp-*``) checkpoints: ``"tiny"`` | ``"full"`` | path of a Diff-Foley CAVP
        checkpoint; ``None``: samplers and heads only (any embedding width).
    roberta_dir: roberta-base config/tokenizer files (RoBERTa CLAP checkpoints).
    expect_preset: refuse a checkpoint of another preset.
    guidance: give the samplers a ``guidance_scale (B, 1)`` input (else g = 1 is baked in).
    fp16: also write ``<name>.fp16.onnx`` (ModelOpt AutoCast; see :mod:`diffgap.export.fp16`).
    check: run the PyTorch parity checks; raise :class:`ExportCheckError` if a bound is missed.
    overwrite: replace an existing export directory.
    opset: ONNX opset (default :data:`diffgap.export.onnx_export.DEFAULT_OPSET`).
    encoder_seed: seed of the random-weight encoder architectures.
    fusion_weights: per retrieval task (``"text_to_audio"`` ...) the score-fusion weights chosen on the
        validation split (``fusion_weights_from_eval``); stored as ``manifest.extra["fusion_weights"]``.
    generation_steps: K of the generation sampler (raw-space samples for a generator), or None: not exported.
    """

    steps: int | None = None
    bridge_mode: str | None = None
    encoders: str | os.PathLike | None = "tiny"
    roberta_dir: str | os.PathLike | None = None
    expect_preset: str | None = None
    guidance: bool = True
    fp16: bool = True
    check: bool = False
    overwrite: bool = False
    opset: int | None = None
    encoder_seed: int = 0
    fusion_weights: dict[str, dict[str, float]] | None = None
    generation_steps: int | None = None   # also export the generation sampler (export/generation.py) with K steps


def plan_export(checkpoint: str | os.PathLike, out: str | os.PathLike, options: ExportOptions = ExportOptions()) -> ExportPlan:
    """Validate the options, load the checkpoint and encoders and list the jobs."""
    o = options
    steps, overwrite = o.steps, o.overwrite
    out, ckpt = Path(out), Path(checkpoint)
    _check_out_dir(out, overwrite)
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:
        raise UserError(f"--steps {steps} is out of range: K must be >= 1")

    from diffgap.checkpoint import WEIGHTS, load_checkpoint
    from diffgap.core.fsutil import sha256_file

    from diffgap.models import parse_direction

    from .fused import FusedSampler, ProjectionHead
    from .onnx_export import DEFAULT_OPSET

    model, meta = load_checkpoint(ckpt, expect_preset=o.expect_preset)
    cfg = model.config
    _check_steps(steps, cfg.diffusion.num_train_timesteps)
    # validates K against the bridge start (source mode: K <= t0*T) before any encoder loads
    samplers = [FusedSampler(model, d, steps, guidance=o.guidance, mode=o.bridge_mode) for d in cfg.directions]

    family = ENCODER_FAMILIES.get(tuple(sorted(cfg.modalities)))
    enc, jobs, conditions = None, [], {}
    if o.encoders is not None and family == "cavp":
        enc, source = _cavp_encoder(o.encoders, o.encoder_seed)
        if set(cfg.input_dims.values()) != {enc.embed_dim}:
            raise UserError(
                f"checkpoint {cfg.name!r} takes embeddings of widths {cfg.input_dims} but the CAVP encoders output "
                f"{enc.embed_dim}-d; pass a checkpoint trained on CAVP embeddings, or --encoders none (samplers only)"
            )
        jobs, conditions = _encoder_jobs(family, enc, source)
    elif o.encoders is not None:
        enc = _clap_encoder(o.encoders, o.roberta_dir, o.encoder_seed, cfg)
        family = "clap"
        jobs, conditions = _encoder_jobs(family, enc, enc.info()["source"])
    if o.generation_steps is not None:
        # the generation sampler (raw-space K-step samples, a generator's condition) of the first
        # direction (audio_given_text / audio_given_video)
        from .generation import GenerationSampler

        samplers.append(GenerationSampler(model, cfg.directions[0], o.generation_steps, guidance=o.guidance,
                                          encoder=meta.get("encoder")))
    for s in samplers:
        _, source_modality = parse_direction(s.direction)
        jobs.append(_sampler_job(s, conditions.get(source_modality)))
    jobs += [_head_job(ProjectionHead(model, m), conditions.get(m)) for m in cfg.modalities]
    return ExportPlan(
        checkpoint=ckpt, out=out, overwrite=overwrite, config=cfg, checkpoint_meta=meta,
        checkpoint_sha256=sha256_file(ckpt / WEIGHTS), family=family, encoder=enc, jobs=jobs,
        opset=DEFAULT_OPSET if o.opset is None else int(o.opset), fp16=o.fp16, check=o.check, fusion_weights=o.fusion_weights,
    )


# ---------------------------------------------------------------------------------------------
# the run: export, convert, lint, check, write the manifest -- atomically
# ---------------------------------------------------------------------------------------------
def run_export(plan: ExportPlan, on_table: Callable[[str], Any] | None = None) -> ExportResult:
    """Carry out ``plan`` into ``plan.out`` (built under a temporary sibling, renamed at the end)."""
    import torch

    from diffgap import __version__
    from diffgap.core.fsutil import atomic_dir
    from diffgap.core.manifest import Manifest, ModelEntry

    from . import check as chk

    t_start = time.time()
    cfg, out = plan.config, plan.out
    common_meta = {
        "diffgap.preset": cfg.name,
        "diffgap.checkpoint_sha256": plan.checkpoint_sha256,
        "diffgap.package_version": __version__,
        "diffgap.embed_dim": str(cfg.embed_dim),
        "diffgap.embed_dims": _json(cfg.input_dims),
    }
    models: dict[str, ModelEntry] = {}
    lint: dict[str, dict] = {}
    rows: list = []
    with contextlib.ExitStack() as stack:
        tmp = _enter_out_dir(stack, atomic_dir, out, plan.overwrite)
        stack.enter_context(torch.no_grad())
        for job in plan.jobs:
            io, files = job.module.io_spec(), _export_job(job, tmp, common_meta, plan, lint)
            if plan.check:
                rows.append(chk.check_model(
                    job.module, io, tmp / files["fp32"], tmp / files["fp16"] if plan.fp16 else None,
                    kind=job.check_kind, fp16_backend=job.fp16_backend, feeds_fn=job.parity_feeds or job.feeds,
                ))
            models[io.name] = ModelEntry(io=io, files=files, meta=dict(job.meta))

        assets: dict[str, str] = {}
        if plan.encoder is not None and plan.family == "clap":
            assets["tokenizer"] = plan.encoder.tokenizer.save(tmp).relative_to(tmp).as_posix()
        parity = table = None
        if plan.check:
            table, parity = chk.format_table(rows), chk.summarize(rows)
            if on_table is not None:
                on_table(table)
            if not parity["ok"]:
                bad = [r.model for r in rows if not r.ok]
                raise ExportCheckError(
                    f"parity check failed for {bad} (see the parity table); nothing was written -- "
                    "re-export with --verbose and report the table", table,
                )
        man = Manifest(
            root=tmp, preset=cfg.name, embed_dim=cfg.embed_dim, embed_dims=cfg.input_dims, models=models,
            checkpoint_sha256=plan.checkpoint_sha256, package_version=__version__, assets=assets,
            extra={
                "exporter": {"torch": torch.__version__, "opset": plan.opset, "onnx_exporter": "torchscript (dynamo=False)",
                             "fp16": "nvidia-modelopt AutoCast, keep_io_types" if plan.fp16 else None},
                "checkpoint": {"path": str(plan.checkpoint.resolve()), "step": plan.checkpoint_meta.get("step")},
                "encoder_family": plan.family,
                "lint": {k: {"ok": v["ok"], "warnings": v["warnings"]} for k, v in lint.items()},
                **({"parity": parity} if parity is not None else {}),
                **({"fusion_weights": plan.fusion_weights} if plan.fusion_weights else {}),
            },
        )
        man.save()
        _public_permissions(tmp)
    man.root = out
    return ExportResult(out=out, manifest=man, lint=lint, parity=parity, table=table, seconds=time.time() - t_start)


def _export_job(job: ExportJob, tmp: Path, common_meta: dict, plan: ExportPlan, lint: dict) -> dict[str, str]:
    """Write ``job``'s FP32 graph (and FP16 graph, calibrated on ``job.feeds``), lint both; returns the files."""
    from . import calibration as cal
    from .fp16 import convert_fp16
    from .lint import lint_model
    from .onnx_export import META_GRAPH_PRECISION, export_module

    io = job.module.io_spec()
    files = {"fp32": f"{io.name}.onnx"}
    gmeta = {
        **common_meta,
        "diffgap.model": io.name,
        **{f"diffgap.{k}": v if isinstance(v, str) else _json(v) for k, v in job.meta.items()},
    }
    if job.check_kind == "denoiser":  # the fused samplers (a head alone has no K)
        gmeta["diffgap.K"] = str(job.module.steps)
        gmeta["diffgap.schedule"] = plan.config.diffusion.schedule
    t0 = time.time()
    export_module(job.module, io, tmp / files["fp32"], opset=plan.opset, metadata={**gmeta, META_GRAPH_PRECISION: "fp32"})
    log.info("%s: fp32 graph in %.1f s", io.name, time.time() - t0)
    if plan.fp16:
        files["fp16"] = f"{io.name}.fp16.onnx"
        t0 = time.time()
        convert_fp16(tmp / files["fp32"], tmp / files["fp16"], io, kind=job.fp16_kind,
                     calibration=job.feeds(cal.CALIBRATION_BATCH, 1))
        log.info("%s: fp16 graph in %.1f s", io.name, time.time() - t0)
    for rel in files.values():
        rep = lint_model(tmp / rel)
        lint[rel] = rep.to_dict()
        if not rep.ok:
            raise RuntimeError(f"{rel} fails the TensorRT lint:\n{rep.format()}")
        for w in rep.warnings:
            log.warning("%s: %s", rel, w)
    return files


def _enter_out_dir(stack: contextlib.ExitStack, atomic_dir, out: Path, overwrite: bool) -> Path:
    """Enter ``atomic_dir(out)`` on ``stack``; an OS failure to *create* the temporary directory becomes one clear line."""
    try:
        return stack.enter_context(atomic_dir(out, overwrite=overwrite))
    except FileExistsError:
        raise
    except OSError as e:
        raise PermissionError(f"cannot create the export directory {out} ({e.strerror or e}); choose a writable --out") from None


def _public_permissions(root: Path) -> None:
    """Temp files/dirs are created 0600/0700; give the export the caller's umask defaults (0644/0755
    with the usual umask) so a Triton server running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True)
