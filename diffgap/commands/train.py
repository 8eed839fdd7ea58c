"""``diffgap train``: train a DiffGAP preset on paired embeddings (torchrun-ready)."""
from __future__ import annotations

import argparse

HELP = "train contrastive heads + both conditional denoisers on a paired-embedding .npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diffgap.config import DEFAULT_PRESET, PRESETS  # torch-free

    p.add_argument("--data", required=True, help="training split .npz (diffgap synth / diffgap embed)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"model preset (default {DEFAULT_PRESET})")
    p.add_argument("--steps", type=int, help="override the preset's training steps")
    p.add_argument("--batch-size", type=int, help="override the per-process batch size (heads InfoNCE; the denoisers train on the first min(this, preset denoiser_batch_size) rows)")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--prediction", choices=["x0", "eps", "v"], help="override the network's prediction target")
    p.add_argument("--resume", action="store_true", help="continue from the training state saved in --out")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    p.add_argument("--stop-after", type=int, help="stop this run after N steps with a resumable checkpoint (continue with --resume)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffgap.config import get_preset
    from diffgap.core.data import load_pairs
    from diffgap.models import count_parameters
    from diffgap.train import init_distributed, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    for key, attr in (("train.steps", "steps"), ("train.batch_size", "batch_size"), ("train.lr", "lr"),
                      ("train.seed", "seed"), ("diffusion.prediction", "prediction")):
        if getattr(args, attr) is not None:
            cfg = cfg.replace(**{key: getattr(args, attr)})
    dist_info = init_distributed()
    data = load_pairs(args.data, embed_dim=cfg.embed_dim, require=cfg.modalities)
    res = train(cfg, data, out=args.out, resume=args.resume, progress=not args.no_progress,
                save_every=args.save_every, dist_info=dist_info, extra_meta={"data": str(args.data)},
                stop_after=args.stop_after)
    if dist_info.main:
        counts = res.model.parameter_counts()
        per_dir = ", ".join(f"{d} {counts[d] / 1e6:.2f}M" for d in cfg.directions)
        print(f"trained {cfg.name}: {res.steps}/{cfg.train.steps} steps x batch {cfg.train.batch_size} (denoisers {cfg.train.denoiser_batch_size}) x {dist_info.world} process(es) in "
              f"{res.seconds:.0f} s; parameters: heads {counts['heads'] / 1e6:.2f}M, {per_dir}, total {count_parameters(res.model) / 1e6:.2f}M")
        last = res.history[-1] if res.history else {}
        print("final losses: " + ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k not in ("step", "lr")))
        print(f"checkpoint: {res.checkpoint}")
    return 0
