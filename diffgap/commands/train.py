"""``diffgap train``: train a DiffGAP preset on paired embeddings (torchrun-ready)."""
from __future__ import annotations

import argparse

HELP = "train contrastive heads + both conditional denoisers on a paired-embedding .npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diffgap.config import DEFAULT_PRESET, PRESETS  # torch-free

    p.add_argument("--data", required=True, help="training split .npz (diffgap synth / diffgap embed)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--val", help="validation split .npz: the step budget comes from early stopping on it and the best "
                                 "weights are kept (heads and denoisers each get their own budget; see diffgap.train_val)")
    p.add_argument("--schedule", choices=["auto", "two-stage", "joint"],
                   help="with --val: 'two-stage' (heads, then denoisers on the frozen space), 'joint' (one loss), or "
                        "'auto' (train both, keep the better on validation; the preset's default)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"model preset: the architecture's sizes (default {DEFAULT_PRESET}); each modality's input width "
                        "comes from --data (384, 512, 768, ...; the two may differ)")
    p.add_argument("--steps", type=int, help="override the preset's training steps (without --val)")
    p.add_argument("--batch-size", type=int, help="override the per-process batch size (heads InfoNCE; the denoisers train on the first min(this, preset denoiser_batch_size) rows)")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--prediction", choices=["x0", "eps", "v"], help="override the network's prediction target")
    p.add_argument("--resume", action="store_true", help="continue from the training state saved in --out")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    p.add_argument("--stop-after", type=int, help="stop this run after N steps with a resumable checkpoint (continue with --resume)")
    p.add_argument("--head-mlp-hidden", type=int, metavar="N",
                   help="with --val: width of the MLP-heads candidate validation compares with linear heads "
                        "(0: linear heads only; default: the preset's train.head_mlp_hidden)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-eval-controls", action="store_true",
                   help="with --val: do not fit the eval controls (linear adapter, regression bridges) in a second process "
                        "beside the denoiser stage (default, when torch has 2 or more threads: fitted there on one of them and saved in "
                        "<out>/controls for `diffgap eval`)")


def run(args: argparse.Namespace) -> int:
    import torch

    from diffgap.config import get_preset
    from diffgap.core.data import load_pairs
    from diffgap.core.errors import UserError
    from diffgap.models import count_parameters
    from diffgap.train import init_distributed, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.head_mlp_hidden is not None and args.head_mlp_hidden < 0:
        raise UserError(f"--head-mlp-hidden must be >= 0 (0: linear heads only), got {args.head_mlp_hidden}")
    cfg = get_preset(args.preset)
    for key, attr in (("train.steps", "steps"), ("train.batch_size", "batch_size"), ("train.lr", "lr"),
                      ("train.seed", "seed"), ("diffusion.prediction", "prediction"),
                      ("train.head_mlp_hidden", "head_mlp_hidden")):
        if getattr(args, attr) is not None:
            cfg = cfg.replace(**{key: getattr(args, attr)})
    if args.schedule is not None:
        cfg = cfg.replace(**{"train.schedule": args.schedule})
    dist_info = init_distributed()
    data = load_pairs(args.data, require=cfg.modalities)
    cfg = adapt_input_dims(cfg, data)
    if args.val is not None:
        return _run_validated(args, cfg, data, dist_info.world)
    if len(data) < cfg.train.batch_size:
        raise UserError(f"training data {args.data} has {len(data)} pairs, fewer than batch size {cfg.train.batch_size}; lower --batch-size")
    if args.schedule is not None:
        raise UserError("--schedule needs --val (the schedules are chosen and stopped on the validation split); add --val VAL.npz")
    res = train(cfg, data, out=args.out, resume=args.resume, progress=not args.no_progress,
                save_every=args.save_every, dist_info=dist_info, extra_meta={"data": str(args.data), **_encoder_meta(data)},
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


def adapt_input_dims(cfg, data):
    """``cfg`` with each modality's input width taken from ``data`` (the preset sets only the sizes)."""
    have = {m: data.dims[m] for m in cfg.modalities}
    if have == cfg.input_dims:
        return cfg
    print(f"input widths from {data.path}: " + ", ".join(f"{m} {e}" for m, e in have.items())
          + f" (preset {cfg.name} sets the sizes: head dim {cfg.heads.dim}, denoiser width {cfg.denoiser.hidden})")
    return cfg.with_input_dims(have)


def _run_validated(args: argparse.Namespace, cfg, data, world: int) -> int:
    import time
    from pathlib import Path
    from typing import Any

    from diffgap.checkpoint import save_checkpoint
    from diffgap.core.data import load_pairs
    from diffgap.core.errors import UserError
    from diffgap.models import count_parameters
    from diffgap.train_val import train_validated

    for flag, bad in (("--resume", args.resume), ("--stop-after", args.stop_after is not None),
                      ("--save-every", bool(args.save_every)), ("--steps", args.steps is not None)):
        if bad:
            raise UserError(f"{flag} does not combine with --val (the budget comes from early stopping and the run is not resumable); drop {flag} or --val")
    if world > 1:
        raise UserError("--val training runs in one process; launch without torchrun or drop --val")
    val = load_pairs(args.val, embed_dim=cfg.input_dims, require=cfg.modalities)
    if len(data) < cfg.train.batch_size:
        raise UserError(f"training data {args.data} has {len(data)} pairs, fewer than batch size {cfg.train.batch_size}; lower --batch-size")
    t0 = time.perf_counter()
    side: list[Any] = []

    def after_heads(model):  # the eval controls, fitted beside the denoiser stage on a spare core
        import torch

        from diffgap.eval_controls import BackgroundControls, heads_are_linear_adapter

        if args.no_eval_controls or torch.get_num_threads() < 2:
            return None
        # fitted for the two-stage model; if validation keeps the joint one, `diffgap eval` sees another
        # key (other heads) and trains the controls itself
        side.append(BackgroundControls(model, str(args.data), str(args.val), heads_are_linear_adapter(model),
                                       Path(args.out).resolve().parent))
        return side[-1]

    try:
        model, record = train_validated(cfg, data, val, progress=not args.no_progress, after_heads=after_heads)
        seconds = time.perf_counter() - t0
        chosen = record["candidates"][record["chosen"]]
        steps = sum(st["steps_run"] for st in chosen["stages"].values())
        meta = {"data": str(args.data), "val": str(args.val), "step": steps, "train_seconds": round(seconds, 2),
                "parameters": model.parameter_counts(), "world_size": 1, "validation": record, **_encoder_meta(data)}
        ckpt = save_checkpoint(args.out, model, meta)
    except BaseException:  # interrupted or failed: stop the controls' process, leave no scratch folder
        for s in side:
            s.cancel()
        raise
    for s in side:
        dest = s.finish(ckpt)
        if dest is not None:
            print(f"eval controls (linear adapter, regression bridges) fitted beside the denoiser stage in {s.seconds:.0f} s -> {dest}")
    counts = model.parameter_counts()
    print(f"trained {cfg.name} with validation on {record['n_val_pairs']} pairs of {args.val} in {seconds:.0f} s; "
          f"parameters: heads {counts['heads'] / 1e6:.2f}M, total {count_parameters(model) / 1e6:.2f}M")
    for name, cand in record["candidates"].items():
        stages = "; ".join(f"{k} best at step {st['best_step']} of {st['steps_run']} ({st['lr_decays']} lr decay(s), {st['seconds']:.0f} s)"
                           for k, st in cand["stages"].items())
        f = cand["final"]
        print(f"  {name:<10} val head R@1 {f['head_r1']:.1f}, bridge R@1 {f['bridge_r1']:.1f}, score {f['score']:.2f}: {stages}")
    print(f"chosen: {record['chosen']} -- {record['why']}")
    print(f"checkpoint: {ckpt}")
    return 0


def _encoder_meta(data) -> dict:
    """The embedding encoder's identity (``diffgap embed --hf-clap``), which ``diffgap generate`` checks."""
    from diffgap.core.names import META_ENCODER

    return {META_ENCODER: data.encoder} if getattr(data, "encoder", None) else {}
