"""``diffgap build-engines EXPORT_DIR``: TensorRT engines for every model of an export (GPU host)."""
from __future__ import annotations

import argparse

from diffgap.core.names import PRECISIONS

HELP = "build TensorRT engines (strongly typed, from the FP16 ONNX) for an export directory; GPU host only"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="directory written by `diffgap export`")
    p.add_argument("--models", nargs="+", metavar="NAME", help="only these models (default: every model in manifest.json)")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp16"],
                   help="engines to build: fp16 from <name>.fp16.onnx, fp32 from <name>.onnx (default: fp16)")
    p.add_argument("--engine-dir", metavar="DIR", help="engine cache directory (default: EXPORT_DIR/engines)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), metavar="{0..5}",
                   help="TensorRT builder optimisation level (default: 3)")
    p.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit in MiB (default: TensorRT's)")
    p.add_argument("--device", type=int, default=0, help="CUDA device to build on: made current during the build, and its GPU model keys the cache (default: 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-rebuild", action="store_true",
                   help="refuse (exit 2) instead of rebuilding engines built for another export, TensorRT or GPU")
    g.add_argument("--force", action="store_true", help="rebuild every engine even when its cache key matches")


def run(args: argparse.Namespace) -> int:
    from diffgap.core.errors import UserError
    from diffgap.core.manifest import Manifest

    from .engine import BuildSettings, build_engines

    man = Manifest.load(args.export_dir, verify=True)
    unknown = sorted(set(args.models or ()) - set(man.models))
    if unknown:
        raise UserError(f"--models {' '.join(unknown)}: not in {man.root} (it has {' '.join(sorted(man.models))})")
    decisions = build_engines(
        man, models=args.models, precisions=args.precision, engine_dir=args.engine_dir,
        settings=BuildSettings(opt_level=args.opt_level, workspace_mib=args.workspace_mib),
        rebuild=not args.no_rebuild, force=args.force, device=args.device,
    )
    for d in decisions:
        print(f"{d.action:8s} {d.model:28s} {d.precision}  {d.plan}  ({d.reason})")
    return 0
