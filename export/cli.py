"""``diffgap export CHECKPOINT --out DIR``: encoders + fused samplers, FP32 + FP16 ONNX, manifest.

Writes into DIR (built under a temporary sibling and renamed at the end, so a failure leaves nothing)::

    clap_text_encoder.onnx        clap_text_encoder.fp16.onnx
    clap_audio_encoder.onnx       clap_audio_encoder.fp16.onnx
    diffgap_text_to_audio.onnx    diffgap_text_to_audio.fp16.onnx
    diffgap_audio_to_text.onnx    diffgap_audio_to_text.fp16.onnx
    bpe_simple_vocab_16e6.txt.gz  (or tokenizer.json for RoBERTa towers)
    manifest.json                 (diffgap.core.manifest: IOSpecs, files + sha256, parity and lint figures)

for a text<->audio (CLAP-space) checkpoint, and for a video<->audio (CAVP-space, ``cavp-*`` preset) one::

    cavp_video_encoder.onnx       cavp_video_encoder.fp16.onnx
    cavp_audio_encoder.onnx       cavp_audio_encoder.fp16.onnx
    diffgap_video_to_audio.onnx   diffgap_video_to_audio.fp16.onnx
    diffgap_audio_to_video.onnx   diffgap_audio_to_video.fp16.onnx
    manifest.json

The encoder family follows the checkpoint's modalities (:data:`ENCODER_FAMILIES`); ``--encoders``
names the architecture or checkpoint of that family.

Every graph passes the ONNX checker, strict shape inference and the TensorRT lint
(:mod:`diffgap.export.lint`) or the export fails. ``--check`` adds the PyTorch parity checks
(:mod:`diffgap.export.check`) and fails the export if a bound is missed.

Python API for the demo, runtime/Triton tests and benchmarks: :func:`export_all`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .provenance import check_export_args

log = logging.getLogger(__name__)

HELP = "export a checkpoint to ONNX (CLAP or CAVP encoders + fused K-step samplers, FP32 + FP16) with a manifest"
ENCODER_ARCHS = ("tiny", "htsat-tiny")
CAVP_ENCODER_CONFIGS = ("tiny", "full")   # diffgap.encoders.cavp.CAVP_CONFIGS (random weights)
# sorted checkpoint modalities -> the contrastive encoders whose space the denoisers bridge
ENCODER_FAMILIES = {("audio", "text"): "clap", ("audio", "video"): "cavp"}
_CAPTIONS = (
    "a dog barks twice in the distance",
    "rain falls steadily on a tin roof",
    "a steady 440 hertz sine tone",
    "people talk in a busy cafe",
    "a car engine starts and idles",
    "birds chirp in the early morning",
    "loud white noise hiss",
    "a rising sine sweep from low to high pitch",
)


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory written by `diffgap train`")
    p.add_argument("--out", required=True, help="export directory to create (must not exist or be empty unless --overwrite)")
    p.add_argument("--steps", "-K", type=int, default=None,
                   help="K DDIM steps unrolled in the fused samplers (default: the checkpoint's diffusion.sample_steps)")
    p.add_argument("--bridge-mode", choices=("source", "noise"), default=None,
                   help="bridge from the noised source embedding at t0 ('source') or from pure noise ('noise'); "
                        "default: the checkpoint's diffusion.bridge_mode")
    p.add_argument("--encoders", default="tiny",
                   help="encoders to export, of the family the checkpoint's modalities imply. text<->audio (CLAP): "
                        "'tiny' or 'htsat-tiny' (offline architectures, random weights: demos/tests) or a LAION-CLAP "
                        "checkpoint file (e.g. 630k-audioset-best.pt); video<->audio (CAVP): 'tiny' or 'full' (random "
                        "weights) or a Diff-Foley CAVP checkpoint file (full architecture); or 'none'")
    p.add_argument("--roberta-dir", default=None, help="directory with roberta-base config/tokenizer files (RoBERTa checkpoints)")
    p.add_argument("--preset", default=None, help="refuse a checkpoint of any other preset")
    p.add_argument("--no-guidance-input", action="store_true",
                   help="bake guidance scale 1 into the samplers (no guidance_scale input; half the graph)")
    p.add_argument("--check", action="store_true", help="validate parity against PyTorch and print the parity table")
    p.add_argument("--fusion-weights", metavar="EVAL_JSON", default=None,
                   help="`diffgap eval --json` output: store its validation-chosen fusion weights (the 'full' row of "
                        "each task) in the manifest, where the runtime's search and Triton read them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")


def fusion_weights_from_eval(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The validation-chosen fusion weights of the ``full`` system, per task, from `diffgap eval --json`.

    Task names become the runtime's (``"text->audio"`` -> ``"text_to_audio"``); component names stay
    evaluate's (``raw``, ``heads``, ``q-bridge src`` ...), which ``diffgap.runtime.pipeline`` maps.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--fusion-weights {path} not found; write it with `diffgap eval --json {path}`")
    try:
        tasks = json.loads(path.read_text())["tasks"]
        return {task.replace("->", "_to_"): dict(res["rows"]["full"]["weights"]) for task, res in tasks.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--fusion-weights {path} is not a `diffgap eval --json` report ({e!r}); re-run diffgap eval") from e


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    # SIGTERM (a job scheduler, `timeout`) would end the process without unwinding, leaving the
    # temporary build directory behind; as an exception it is cleaned up like any other failure.
    import signal

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    check_export_args(args)  # fusion weights must have been chosen for this export's bridge settings
    res = export_all(
        args.checkpoint, args.out, steps=args.steps, bridge_mode=args.bridge_mode,
        encoders=None if args.encoders == "none" else args.encoders, roberta_dir=args.roberta_dir,
        expect_preset=args.preset, guidance=not args.no_guidance_input, check=args.check,
        overwrite=args.overwrite, on_table=print,
        fusion_weights=fusion_weights_from_eval(args.fusion_weights) if args.fusion_weights else None,
    )
    man = res.manifest
    print(f"exported {len(man.models)} models ({', '.join(sorted(man.models))}) to {res.out} in {res.seconds:.0f} s")
    for name, rep in sorted(res.lint.items()):
        warn = f", {len(rep['warnings'])} warning(s)" if rep["warnings"] else ""
        print(f"  TensorRT lint {name}: {'PASS' if rep['ok'] else 'FAIL'}{warn}")
    return 0


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
        raise ValueError(f"cannot create --out {out}: {anc} is a file, not a directory; choose another --out")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write under {anc} (permission denied); choose a writable --out")


def _check_steps(steps: int | None, T: int) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"--steps must be an integer, got {steps!r}")
    if steps < 1 or steps > T:
        raise ValueError(f"--steps {steps} is out of range: use 1 <= K <= T = {T} (the schedule's training timesteps)")


def _audio_feeds(io, batch: int, seed: int) -> dict:
    """Realistic prepared clips (48 kHz, 10 s, int16 round trip): tones + noise, distinct per row."""
    import numpy as np

    from diffgap.encoders.clap import CLIP_SAMPLES, SAMPLE_RATE

    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    rows = []
    for i in range(batch):
        f = 110.0 * 2 ** (i * 0.75)
        x = 0.4 * np.sin(2 * np.pi * f * t) + 0.05 * (i % 3) * rng.standard_normal(CLIP_SAMPLES)
        x = np.clip(x, -1.0, 1.0)
        rows.append(np.round(x * 32767.0) / 32767.0)  # laion-clap's int16 quantisation round trip
    return {_waveform_input(io): np.stack(rows).astype(np.float32)}


def _waveform_input(io) -> str:
    """The audio tower's single input name, read from its IOSpec (never retyped here)."""
    if len(io.inputs) != 1:
        raise ValueError(f"{io.name}: expected one waveform input, the IOSpec declares {io.input_names}")
    return io.inputs[0].name


def _cavp_audio_feeds(config, io, batch: int, seed: int) -> dict:
    """Prepared CAVP clips at ``config.sample_rate`` (``clip_samples`` long): tones + noise, distinct per row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(config.clip_samples) / config.sample_rate
    rows = []
    for i in range(batch):
        f = min(110.0 * 2 ** (i * 0.75), 0.4 * config.sample_rate)
        x = 0.4 * np.sin(2 * np.pi * f * t) + 0.05 * (i % 3) * rng.standard_normal(t.size)
        rows.append(np.clip(x, -1.0, 1.0))
    return {_waveform_input(io): np.stack(rows).astype(np.float32)}


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


def _text_feeds(encoder, batch: int, seed: int) -> dict:
    caps = [_CAPTIONS[(seed + i) % len(_CAPTIONS)] for i in range(batch)]
    return encoder.tokenize(caps)


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def export_all(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    bridge_mode: str | None = None,
    encoders: str | os.PathLike | None = "tiny",
    roberta_dir: str | os.PathLike | None = None,
    expect_preset: str | None = None,
    guidance: bool = True,
    fp16: bool = True,
    check: bool = False,
    overwrite: bool = False,
    opset: int | None = None,
    encoder_seed: int = 0,
    on_table=None,
    fusion_weights: dict[str, dict[str, float]] | None = None,
) -> ExportResult:
    """Export a DiffGAP checkpoint (+ CLAP encoders) to the ONNX export directory ``out``.

    Args:
        checkpoint: checkpoint directory (``diffgap train``).
        out: export directory; built atomically (nothing is left behind on failure).
        steps: K for the fused samplers (default: the checkpoint's ``diffusion.sample_steps``).
        bridge_mode: ``"source"`` | ``"noise"`` (default: the checkpoint's).
        encoders: text<->audio checkpoints: ``"tiny"`` | ``"htsat-tiny"`` | path of a LAION-CLAP checkpoint;
            video<->audio (``cavp-*``) checkpoints: ``"tiny"`` | ``"full"`` | path of a Diff-Foley CAVP
            checkpoint; ``None``: samplers only.
        expect_preset: refuse a checkpoint of another preset.
        guidance: give the samplers a ``guidance_scale (B, 1)`` input (else g = 1 is baked in).
        fp16: also write ``<name>.fp16.onnx`` (ModelOpt AutoCast; see :mod:`diffgap.export.fp16`).
        check: run the PyTorch parity checks; raise :class:`ExportCheckError` if a bound is missed.
        on_table: callable receiving the parity table text (the CLI passes ``print``), also on failure.
        fusion_weights: per retrieval task (``"text_to_audio"`` ...) the score-fusion weights chosen on the
            validation split (:func:`fusion_weights_from_eval`); stored as ``manifest.extra["fusion_weights"]``.

    Returns an :class:`ExportResult`; ``result.manifest`` is the saved :class:`~diffgap.core.manifest.Manifest`.
    """
    t_start = time.time()
    out = Path(out)
    ckpt = Path(checkpoint)
    _check_out_dir(out, overwrite)
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:
        raise ValueError(f"--steps {steps} is out of range: K must be >= 1")

    import torch

    from diffgap import __version__
    from diffgap.checkpoint import WEIGHTS, load_checkpoint
    from diffgap.core.fsutil import atomic_dir, sha256_file
    from diffgap.core.manifest import Manifest, ModelEntry

    from . import check as chk
    from .fp16 import convert_fp16
    from .fused import FusedSampler
    from .lint import lint_model
    from .onnx_export import DEFAULT_OPSET, export_module

    opset = DEFAULT_OPSET if opset is None else int(opset)
    model, meta = load_checkpoint(ckpt, expect_preset=expect_preset)
    cfg = model.config
    _check_steps(steps, cfg.diffusion.num_train_timesteps)
    samplers = [
        FusedSampler(model, d, steps, guidance=guidance, mode=bridge_mode) for d in cfg.directions
    ]  # validates K against the bridge start (source mode: K <= t0*T)

    enc = None
    family = ENCODER_FAMILIES.get(tuple(sorted(cfg.modalities)))
    if encoders is not None and family == "cavp":
        enc, cavp_source = _cavp_encoder(encoders, encoder_seed)
        if cfg.embed_dim != enc.embed_dim:
            raise ValueError(
                f"checkpoint preset {cfg.name!r} takes {cfg.embed_dim}-d embeddings but the CAVP encoders output "
                f"{enc.embed_dim}-d; pass a checkpoint trained on CAVP embeddings"
            )
    elif encoders is not None:
        from diffgap.encoders.clap import EMBED_DIM, ClapEncoder

        if tuple(sorted(cfg.modalities)) != ("audio", "text"):
            raise ValueError(
                f"checkpoint preset {cfg.name!r} bridges {cfg.modalities}, not text<->audio: CLAP encoders do not "
                "apply; pass --encoders none or a CLAP-space checkpoint"
            )
        if cfg.embed_dim != EMBED_DIM:
            raise ValueError(
                f"checkpoint preset {cfg.name!r} takes {cfg.embed_dim}-d embeddings but CLAP encoders output "
                f"{EMBED_DIM}-d; pass a checkpoint trained on CLAP embeddings"
            )
        enc_src = str(encoders)
        if enc_src in ENCODER_ARCHS:
            log.warning("exporting the offline %r CLAP architecture with random weights (demo/test use); "
                        "pass --encoders PATH to a LAION-CLAP checkpoint for real embeddings", enc_src)
            enc = ClapEncoder.from_arch(enc_src, seed=encoder_seed)
        else:
            p = Path(enc_src)
            if not p.is_file():
                raise FileNotFoundError(
                    f"--encoders {enc_src!r} is neither one of {ENCODER_ARCHS} nor an existing LAION-CLAP checkpoint file"
                )
            enc = ClapEncoder.from_checkpoint(p, roberta_dir=roberta_dir)

    ckpt_sha = sha256_file(ckpt / WEIGHTS)
    common_meta = {
        "diffgap.preset": cfg.name,
        "diffgap.checkpoint_sha256": ckpt_sha,
        "diffgap.package_version": __version__,
        "diffgap.embed_dim": str(cfg.embed_dim),
    }
    # (module, kind for fp16, kind for check, fp16 parity backend, feeds_fn, per-model meta); the
    # audio tower's FP16 parity runs on ORT CPU (see diffgap.export.check for what that measures).
    jobs: list[tuple[Any, str, str, str, Any, dict]] = []
    if enc is not None and family == "cavp":
        # Both CAVP towers' FP16 parity runs on ORT CPU: the reference evaluator's numpy 3-D/2-D
        # convolutions take far too long at full size (ResNet3D-50 on 16 x 224 x 224 frames).
        enc_meta = {"encoder": cavp_source, "cavp_config": enc.config.name}
        jobs.append((enc.video_module, "video_encoder", "encoder", "ort", None, enc_meta))
        jobs.append((enc.audio_module, "cavp_audio_encoder", "encoder", "ort",
                     lambda b, s: _cavp_audio_feeds(enc.config, enc.audio_module.io_spec(), b, s), enc_meta))
    elif enc is not None:
        enc_meta = {"encoder": enc.info()["source"], "clap_arch": enc.arch.name, "tokenizer": enc.tokenizer.kind}
        jobs.append((enc.text_module, "text_encoder", "encoder", "reference", lambda b, s: _text_feeds(enc, b, s), enc_meta))
        jobs.append((enc.audio_module, "audio_encoder", "encoder", "ort", lambda b, s: _audio_feeds(enc.audio_module.io_spec(), b, s), enc_meta))
    for s in samplers:
        jobs.append((s, "denoiser", "denoiser", "reference", None, s.metadata()))

    models: dict[str, ModelEntry] = {}
    lint: dict[str, dict] = {}
    rows: list = []
    with _atomic_out(atomic_dir, out, overwrite) as tmp, torch.no_grad():
        for module, fp16_kind, check_kind, fp16_backend, feeds_fn, mmeta in jobs:
            io = module.io_spec()
            files = {"fp32": f"{io.name}.onnx"}
            gmeta = {
                **common_meta,
                "diffgap.model": io.name,
                **{f"diffgap.{k}": v if isinstance(v, str) else _json(v) for k, v in mmeta.items()},
            }
            if fp16_kind == "denoiser":
                gmeta["diffgap.K"] = str(module.steps)
                gmeta["diffgap.schedule"] = cfg.diffusion.schedule
            t0 = time.time()
            export_module(module, io, tmp / files["fp32"], opset=opset, metadata={**gmeta, "diffgap.precision": "fp32"})
            log.info("%s: fp32 graph in %.1f s", io.name, time.time() - t0)
            if fp16:
                files["fp16"] = f"{io.name}.fp16.onnx"
                t0 = time.time()
                convert_fp16(tmp / files["fp32"], tmp / files["fp16"], io, kind=fp16_kind)
                log.info("%s: fp16 graph in %.1f s", io.name, time.time() - t0)
            for prec, rel in files.items():
                rep = lint_model(tmp / rel)
                lint[rel] = rep.to_dict()
                if not rep.ok:
                    raise ValueError(f"{rel} fails the TensorRT lint:\n{rep.format()}")
                for w in rep.warnings:
                    log.warning("%s: %s", rel, w)
            if check:
                rows.append(chk.check_model(
                    module, io, tmp / files["fp32"], tmp / files.get("fp16") if fp16 else None,
                    kind=check_kind, fp16_backend=fp16_backend, feeds_fn=feeds_fn,
                ))
            models[io.name] = ModelEntry(io=io, files=files, meta=dict(mmeta))

        assets: dict[str, str] = {}
        if enc is not None and family == "clap":
            assets["tokenizer"] = enc.tokenizer.save(tmp).relative_to(tmp).as_posix()
        parity = table = None
        if check:
            table = chk.format_table(rows)
            parity = chk.summarize(rows)
            if on_table is not None:
                on_table(table)
            if not parity["ok"]:
                bad = [r.model for r in rows if not r.ok]
                raise ExportCheckError(
                    f"parity check failed for {bad} (see the parity table); nothing was written -- "
                    "re-export with --verbose and report the table", table,
                )
        man = Manifest(
            root=tmp, preset=cfg.name, embed_dim=cfg.embed_dim, models=models, checkpoint_sha256=ckpt_sha,
            package_version=__version__, assets=assets,
            extra={
                "exporter": {"torch": torch.__version__, "opset": opset, "onnx_exporter": "torchscript (dynamo=False)",
                             "fp16": "nvidia-modelopt AutoCast, keep_io_types" if fp16 else None},
                "checkpoint": {"path": str(ckpt.resolve()), "step": meta.get("step")},
                "encoder_family": family,
                "lint": {k: {"ok": v["ok"], "warnings": v["warnings"]} for k, v in lint.items()},
                **({"parity": parity} if parity is not None else {}),
                **({"fusion_weights": fusion_weights} if fusion_weights else {}),
            },
        )
        man.save()
        _public_permissions(tmp)
    man.root = out
    return ExportResult(out=out, manifest=man, lint=lint, parity=parity, table=table, seconds=time.time() - t_start)


@contextlib.contextmanager
def _atomic_out(atomic_dir, out: Path, overwrite: bool):
    """``atomic_dir`` with an OS failure to *create* the temporary directory turned into one clear line."""
    try:
        cm = atomic_dir(out, overwrite=overwrite)
        tmp = cm.__enter__()
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise PermissionError(f"cannot create the export directory {out} ({e.strerror or e}); choose a writable --out") from None
    try:
        yield tmp
    except BaseException:
        if not cm.__exit__(*sys.exc_info()):
            raise
    else:
        cm.__exit__(None, None, None)


def _public_permissions(root: Path) -> None:
    """Temp files/dirs are created 0600/0700; give the export the caller's umask defaults (0644/0755
    with the usual umask) so a Triton server running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _json(v: Any) -> str:
    import json

    return json.dumps(v, sort_keys=True)
