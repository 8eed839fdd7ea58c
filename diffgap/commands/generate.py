"""``diffgap generate``: captions -> N waveforms each from a local AudioLDM/MusicLDM folder, conditioned
on DiffGAP bridge samples (or, with ``--no-bridge``, on the caption's own CLAP text embedding: the
stock generator, for A/B listening).

    diffgap generate "a dog barks" "rain on a tin roof" --generator audioldm-s-full/ --checkpoint ckpt/ --out gen/ -n 4
    diffgap generate --captions-file prompts.txt --generator audioldm-s-full/ --no-bridge --out gen_stock/ -n 4

Writes ``<out>/<caption>_<sample>.wav`` and ``<out>/generation.json`` (captions, seeds, settings, the
CLAP fingerprint) as one directory, atomically.
"""
from __future__ import annotations

import argparse

HELP = "generate audio from captions with a local AudioLDM/MusicLDM folder, conditioned on DiffGAP bridge samples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diffgap.core.generation import GEN_GUIDANCE, GEN_STEPS

    p.add_argument("captions", nargs="*", help="captions (or --captions-file)")
    p.add_argument("--captions-file", metavar="TXT", help="one caption per line")
    p.add_argument("--generator", required=True, metavar="DIR",
                   help="local diffusers AudioLDMPipeline/MusicLDMPipeline folder (save_pretrained layout; no hub access)")
    p.add_argument("--checkpoint", metavar="DIR", help="DiffGAP checkpoint trained on this generator's CLAP (not needed with --no-bridge)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (WAV files + generation.json)")
    p.add_argument("-n", type=int, default=1, help="waveforms per caption (default 1)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one per caption, or one seed s (caption b gets s + b; default 0); sample j of a caption is derived from it")
    p.add_argument("--no-bridge", action="store_true", help="the stock generator: condition on the caption's CLAP text embedding")
    p.add_argument("--steps", "-K", type=int, default=GEN_STEPS, help=f"bridge DDIM steps K (default {GEN_STEPS})")
    p.add_argument("--guidance-scale", type=float, default=GEN_GUIDANCE, help=f"bridge classifier-free guidance (default {GEN_GUIDANCE})")
    p.add_argument("--inference-steps", type=int, help="generator denoising steps (default: the pipeline's)")
    p.add_argument("--audio-length", type=float, metavar="SECONDS", help="audio length in seconds (default: the pipeline's)")
    p.add_argument("--generator-guidance", type=float, help="the generator's guidance scale (default: the pipeline's)")
    p.add_argument("--any-clap", action="store_true", help="skip the check that the checkpoint was trained on this generator's CLAP")
    p.add_argument("--device", default="cpu", help="torch device of the generator (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffgap.core.errors import UserError
    from diffgap.generation_pipeline import GenerationSettings, generate, write_outputs

    captions = list(args.captions)
    if args.captions_file:
        path = Path(args.captions_file)
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} does not exist")
        captions += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not captions:
        raise UserError("no captions: pass them as arguments or with --captions-file")
    if len(args.seed) not in (1, len(captions)):
        raise UserError(f"--seed takes one seed or one per caption ({len(captions)}), got {len(args.seed)}")
    if min(args.seed) < 0:
        raise UserError("--seed values must be non-negative")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite or choose another --out")
    settings = GenerationSettings(n=args.n, seeds=list(args.seed), bridge=not args.no_bridge, steps=args.steps,
                                  guidance_scale=args.guidance_scale, num_inference_steps=args.inference_steps,
                                  audio_length_in_s=args.audio_length, generator_guidance=args.generator_guidance)
    res = generate(captions, args.generator, args.checkpoint, settings, any_clap=args.any_clap,
                   progress=not args.no_progress, device=args.device)
    write_outputs(res, out, overwrite=args.overwrite)
    B, N, L = res.waveforms.shape
    mode = "stock text condition" if args.no_bridge else f"bridged (K = {args.steps}, guidance {args.guidance_scale})"
    print(f"wrote {B * N} waveforms ({B} caption(s) x {N}, {L / res.sample_rate:.2f} s at {res.sample_rate} Hz, {mode}) "
          f"and {out / 'generation.json'}")
    return 0
