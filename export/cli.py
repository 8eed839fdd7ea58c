"""``diffgap export CHECKPOINT --out DIR``: encoders + fused samplers, FP32 + FP16 ONNX, manifest.

Writes into DIR (built under a temporary sibling and renamed at the end, so a failure leaves nothing)::

    clap_text_encoder.onnx        clap_text_encoder.fp16.onnx
    clap_audio_encoder.onnx       clap_audio_encoder.fp16.onnx
    diffgap_text_to_audio.onnx    diffgap_text_to_audio.fp16.onnx
    diffgap_audio_to_text.onnx    diffgap_audio_to_text.fp16.onnx
    text_head.onnx                text_head.fp16.onnx       (the heads alone: queries and gallery items
    audio_head.onnx               audio_head.fp16.onnx       where the bridged terms have weight 0)
    bpe_simple_vocab_16e6.txt.gz  (or tokenizer.json for RoBERTa towers)
    manifest.json                 (diffgap.core.manifest: IOSpecs, files + sha256, parity and lint figures)

for a text<->audio (CLAP-space) checkpoint, and for a video<->audio (CAVP-space, ``cavp-*`` preset) one::

    cavp_video_encoder.onnx       cavp_video_encoder.fp16.onnx
    cavp_audio_encoder.onnx       cavp_audio_encoder.fp16.onnx
    diffgap_video_to_audio.onnx   diffgap_video_to_audio.fp16.onnx
    diffgap_audio_to_video.onnx   diffgap_audio_to_video.fp16.onnx
    video_head.onnx ... audio_head.fp16.onnx
    manifest.json

The encoder family follows the checkpoint's modalities (:data:`ENCODER_FAMILIES`); ``--encoders``
names the architecture or checkpoint of that family; ``--encoders none`` exports the samplers and heads
alone, for embeddings of any width (the checkpoint's, per modality).

Every graph passes the ONNX checker, strict shape inference and the TensorRT lint
(:mod:`diffgap.export.lint`) or the export fails. ``--check`` adds the PyTorch parity checks
(:mod:`diffgap.export.check`) and fails the export if a bound is missed.

Python API for the demo, runtime/Triton tests and benchmarks: :func:`export_all` (= :func:`plan_export`,
which validates and loads everything, then :func:`run_export`, which writes).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from diffgap.core.errors import UserError
from diffgap.core.generation import GEN_STEPS

from .provenance import check_export_args

from .plan import (  # the export API, importable from here as before
    CAVP_ENCODER_CONFIGS, ENCODER_ARCHS, ENCODER_FAMILIES, ExportCheckError, ExportJob, ExportOptions, ExportPlan,
    ExportResult, plan_export, run_export,
)

__all__ = [
    "CAVP_ENCODER_CONFIGS", "ENCODER_ARCHS", "ENCODER_FAMILIES", "ExportCheckError", "ExportJob", "ExportOptions", "ExportPlan",
    "ExportResult", "HELP", "add_arguments", "export_all", "fusion_weights_from_eval", "plan_export", "run", "run_export",
]

HELP = "export a checkpoint to ONNX (CLAP or CAVP encoders + fused K-step samplers, FP32 + FP16) with a manifest"


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
    p.add_argument("--generation", nargs="?", type=int, const=GEN_STEPS, default=None, metavar="K",
                   help=f"also export the generation sampler (K-step samples in the raw CLAP/CAVP space, a generator's "
                        f"condition) with K steps (default {GEN_STEPS}); needs linear square heads (clap-512, cavp-512)")
    p.add_argument("--generator", metavar="DIR", default=None,
                   help="with --generation: also export this local diffusers AudioLDM/MusicLDM folder's CLAP text tower and "
                        "tokenizer (the text encoder of the Triton generation repository, `diffgap triton-repo --generation`)")
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
        raise UserError(f"--fusion-weights {path} is not a `diffgap eval --json` report ({e!r}); re-run diffgap eval") from e


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
    if args.generator and args.generation is None:
        raise UserError("--generator exports the generator's text encoder for generation serving: add --generation")
    check_export_args(args)  # fusion weights must have been chosen for this export's bridge settings
    res = export_all(
        args.checkpoint, args.out, steps=args.steps, bridge_mode=args.bridge_mode,
        encoders=None if args.encoders == "none" else args.encoders, roberta_dir=args.roberta_dir,
        expect_preset=args.preset, guidance=not args.no_guidance_input, check=args.check,
        overwrite=args.overwrite, on_table=print,
        fusion_weights=fusion_weights_from_eval(args.fusion_weights) if args.fusion_weights else None,
        generation_steps=args.generation,
    )
    man = res.manifest
    if args.generator:
        from .generator_text import add_generator_text_encoder

        man = add_generator_text_encoder(res.out, args.generator, fp16=True)
    print(f"exported {len(man.models)} models ({', '.join(sorted(man.models))}) to {res.out} in {res.seconds:.0f} s")
    for name, rep in sorted(res.lint.items()):
        warn = f", {len(rep['warnings'])} warning(s)" if rep["warnings"] else ""
        print(f"  TensorRT lint {name}: {'PASS' if rep['ok'] else 'FAIL'}{warn}")
    return 0


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------
def export_all(checkpoint: str | os.PathLike, out: str | os.PathLike, *, on_table=None, **options) -> ExportResult:
    """Export a DiffGAP checkpoint (+ its encoders) to the ONNX export directory ``out``:
    :func:`plan_export` then :func:`run_export`.

    ``options``: the fields of :class:`~diffgap.export.plan.ExportOptions` (``steps``, ``encoders``,
    ``fusion_weights`` ...). ``on_table``: callable receiving the parity table text (the CLI passes
    ``print``), also on failure. ``out`` is built atomically (nothing is left behind on failure).

    Returns an :class:`ExportResult`; ``result.manifest`` is the saved :class:`~diffgap.core.manifest.Manifest`.
    """
    return run_export(plan_export(checkpoint, out, ExportOptions(**options)), on_table=on_table)
