"""``diffgap eval``: retrieval ablation table, condition-usage table and sample sanity, as text + JSON."""
from __future__ import annotations

import argparse

HELP = "evaluate a checkpoint: T2A/A2T (V2A/A2V for cavp-* presets) R@1/5/10, mAP@10, median rank for every ablation row (+ JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (diffgap train --out)")
    p.add_argument("--data", required=True, help="test split .npz")
    p.add_argument("--val", required=True, help="validation split .npz (fusion weights are chosen here, never on test)")
    p.add_argument("--train", help="training split .npz for the control rows (linear adapter, regression bridge, mean "
                                   "shift) and the generative-prior table (default: the data the checkpoint was trained on)")
    p.add_argument("--no-controls", action="store_true", help="skip the control rows and the prior table")
    p.add_argument("--json", help="write the full result here (default: <checkpoint>/eval.json)")
    p.add_argument("--bridge-steps", type=int, help="K of the retrieval bridge the full row fuses (default: the checkpoint's config, "
                                                    "which an export also uses)")
    p.add_argument("--source-steps", type=int, default=4, help="DDIM steps of the diagnostic bridge from the noised source (default 4)")
    p.add_argument("--noise-steps", type=int, default=10, help="DDIM steps when bridging from noise (default 10)")
    p.add_argument("--noise-samples", type=int, default=4, help="samples averaged when bridging from noise (default 4)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: preset)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")


def heads_trained_as_adapter(model, meta: dict, train_path: str) -> bool:
    """Were this checkpoint's heads trained exactly as the linear-adapter control would be? Linear heads,
    trained alone with validation-driven early stopping (the two-stage schedule's first stage), on the
    training split the controls use. Then the adapter row reuses the heads instead of a second run."""
    from pathlib import Path

    from diffgap.eval_controls import heads_are_linear_adapter

    val = meta.get("validation") or {}
    data = meta.get("data")
    same_split = data is not None and Path(data).resolve() == Path(train_path).resolve()
    return heads_are_linear_adapter(model) and val.get("chosen") == "two-stage" and same_split


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from diffgap.checkpoint import load_checkpoint
    from diffgap.core.data import load_pairs
    from diffgap.core.errors import UserError
    from diffgap.evaluate import EvalConfig, evaluate, format_report
    from diffgap.core.fsutil import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    mods = model.config.modalities
    test = load_pairs(args.data, embed_dim=model.config.input_dims, require=mods)
    val = load_pairs(args.val, embed_dim=model.config.input_dims, require=mods)
    train = None
    adapter_from_heads = False
    if not args.no_controls:
        path = args.train or meta.get("data")
        if path is None or not Path(path).exists():
            raise UserError(f"the control rows need the training split: the checkpoint records {path!r}, which is missing; pass --train TRAIN.npz or --no-controls")
        train = load_pairs(path, embed_dim=model.config.input_dims, require=mods)
        adapter_from_heads = heads_trained_as_adapter(model, meta, path)
    ecfg = EvalConfig(bridge_steps=args.bridge_steps, source_steps=args.source_steps, noise_steps=args.noise_steps, noise_samples=args.noise_samples,
                      guidance_scale=args.guidance_scale, n_boot=args.bootstrap, seed=args.seed)
    from diffgap.eval_controls import CONTROLS_DIR

    res = evaluate(model, test, val, ecfg, train=train, adapter_from_heads=adapter_from_heads,
                   controls_cache=Path(args.checkpoint) / CONTROLS_DIR)
    res["checkpoint"] = str(args.checkpoint)
    res["preset"] = meta["preset"]
    res["parameters"] = model.parameter_counts()
    out = Path(args.json) if args.json else Path(args.checkpoint) / "eval.json"
    atomic_write_json(out, res)
    print(format_report(res))
    print(f"\nwrote {out}")
    return 0
