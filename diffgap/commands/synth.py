"""``diffgap synth``: write the seeded CLAP-like synthetic benchmark (train/val/test .npz)."""
from __future__ import annotations

import argparse
import dataclasses

_TYPES = {"int": int, "float": float}  # SynthConfig fields are ints and floats

HELP = "write the seeded CLAP-like synthetic benchmark (train/val/test .npz + synth.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diffgap.synth import VIDEO_AUDIO_CONFIG, SynthConfig  # numpy only: cheap

    p.add_argument("--out", required=True, help="output directory")
    for f in dataclasses.fields(SynthConfig):
        va = getattr(VIDEO_AUDIO_CONFIG, f.name)
        other = f"; video-audio: {va}" if va != f.default else ""
        p.add_argument(f"--{f.name.replace('_', '-')}", type=_TYPES[str(f.type)],
                       help=f"(default {f.default}{other}; see diffgap/synth.py)")
    p.add_argument("--modalities", choices=["text-audio", "video-audio"], default="text-audio",
                   help="which pair to write: text-audio (CLAP-like, default) or video-audio (CAVP space: the same "
                        "generator with its own seed, 1, unless --seed is given)")
    p.add_argument("--calibrate", action="store_true",
                   help="also print raw and linear-adapter text-to-audio R@1 on the test split (trains a linear adapter; ~1 min)")


def run(args: argparse.Namespace) -> int:
    from diffgap import synth

    mods = tuple(args.modalities.split("-"))
    base = synth.VIDEO_AUDIO_CONFIG if mods == synth.VIDEO_AUDIO else synth.SynthConfig()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(synth.SynthConfig) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(base, **given)
    paths = synth.write(args.out, cfg, mods)
    for split, path in paths.items():
        print(f"wrote {path}")
    rep = synth.calibration_report(cfg, adapter=args.calibrate, modalities=mods)
    print(f"calibration (test split, {mods[0]}->{mods[1]} R@1 %): " + ", ".join(f"{k}={v:.1f}" for k, v in rep.items()))
    return 0
