"""``diffgap embed``: an audio folder and/or a captions CSV -> paired CLAP embeddings (``.npz``).

    diffgap embed --captions clotho_captions_development.csv --audio-dir clotho/development --out dev.npz \\
        --checkpoint 630k-audioset-best.pt
    diffgap embed --audio-dir clips/ --out pairs.npz --arch tiny          # captions in clips/*.txt

Resumable: rerun the same command after an interruption and finished shards are reused. See
:mod:`diffgap.encoders.dataset` for the CSV layouts and how rows are matched to audio files.
"""
from __future__ import annotations

import argparse
import sys

from diffgap.core.errors import UserError

HELP = "embed an audio folder and/or a captions CSV (AudioCaps/Clotho) with CLAP into a paired .npz"

ARCH_CHOICES = ("tiny", "htsat-tiny")  # diffgap.encoders.clap.ARCHS (kept import-free for --help)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio-dir", metavar="DIR", help="folder of audio files (default: the CSV's folder)")
    p.add_argument("--captions", metavar="CSV", help="AudioCaps (audiocap_id,youtube_id,start_time,caption) or "
                   "Clotho (file_name,caption_1..caption_5) captions; without it, captions come from DIR/*.txt sidecars")
    p.add_argument("--out", required=True, metavar="PAIRS.npz", help="output paired-embedding file (written atomically)")
    p.add_argument("--arch", default="tiny", choices=ARCH_CHOICES,
                   help="offline CLAP architecture with random weights (ignored with --checkpoint; default tiny)")
    p.add_argument("--checkpoint", metavar="PT", help="a LAION-CLAP checkpoint (e.g. 630k-audioset-best.pt)")
    p.add_argument("--hf-clap", metavar="DIR", help="embed with a local transformers CLAP instead of laion-clap: a ClapModel "
                   "folder (save_pretrained), or a diffusers AudioLDM/MusicLDM folder (its text tower; audio needs a full "
                   "ClapModel, which MusicLDM has). The .npz records the CLAP's fingerprint for `diffgap generate`")
    p.add_argument("--roberta-dir", metavar="DIR", help="folder with roberta-base config.json + tokenizer files "
                   "(default: the local Hugging Face cache)")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --arch (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="audio files per batch/shard (default 16)")
    p.add_argument("--long-clip", default="center", choices=("center", "start", "chunks"),
                   help="clips over 10 s: centred crop, first 10 s, or the average of 10 s chunks (default center)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from diffgap.encoders.clap import ClapEncoder
    from diffgap.encoders.dataset import embed_plan, plan_from_csv, plan_from_folder

    if not args.captions and not args.audio_dir:
        raise UserError("give --captions CSV and/or --audio-dir DIR")
    plan = plan_from_csv(args.captions, args.audio_dir) if args.captions else plan_from_folder(args.audio_dir)
    if args.hf_clap:
        from diffgap.encoders.hf_clap import HFClapEncoder

        if args.checkpoint:
            raise UserError("--hf-clap and --checkpoint name two different CLAPs; pass one")
        encoder = HFClapEncoder.load(args.hf_clap)
    else:
        encoder = ClapEncoder.load(arch=args.arch, checkpoint=args.checkpoint, roberta_dir=args.roberta_dir, seed=args.seed)
    out, skipped = embed_plan(plan, encoder, args.out, batch_size=args.batch_size, long_clip=args.long_clip,
                              progress=not args.no_progress, overwrite=args.overwrite)
    for item, reason in skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    bad = {item for item, _ in skipped}
    n = sum(1 for p in plan.pairs if p.audio not in bad)
    print(f"wrote {out}: {n} pairs ({len(plan.audio_files)} audio files, {len(plan.captions)} captions), "
          f"{len(skipped)} skipped" + (f" (listed in {out.with_name(out.stem + '.skipped.tsv')})" if skipped else ""))
    return 0
