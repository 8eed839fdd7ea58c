"""``python -m benchmarks``: run the groups, write JSON + markdown + PNGs, print the tables and goals."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import GROUPS, SCHEMA
from .context import FULL, GOAL_ROOFLINE_BATCH, GOAL_SPEEDUP_BATCH, GOAL_STEPS, QUICK, Context
from .harness import TimingPolicy, machine_record, machine_summary

log = logging.getLogger("benchmarks")


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _groups(s: str) -> tuple[str, ...]:
    gs = tuple(g.strip() for g in s.split(",") if g.strip())
    bad = sorted(set(gs) - set(GROUPS))
    if bad or not gs:
        raise argparse.ArgumentTypeError(f"unknown group(s) {bad or s!r}; choose from {','.join(GROUPS)}")
    return gs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory (default: %(default)s)")
    p.add_argument("--preset", default=None, help="DiffGAP preset (default clap-512; clap-tiny with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short timings: proves every entry point runs (smoke test)")
    p.add_argument("--only", type=_groups, default=GROUPS, help=f"comma-separated groups (default: all): {','.join(GROUPS)}")
    p.add_argument("--export-dir", type=Path, action="append", default=None,
                   help="reuse this export (repeatable, e.g. one per K): its samplers serve their K, the first with encoders "
                        "serves encoders/pipeline/Triton; missing K are exported from --checkpoint or a random model of its preset")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to time instead of a random-weight model (timings do not depend on the weights)")
    p.add_argument("--steps", type=_ints, default=None, help="K values for the denoiser grid (default 10,25,50)")
    p.add_argument("--batches", type=_ints, default=None, help="B values for the denoiser grid (default 1,8,64)")
    p.add_argument("--concurrency", type=_ints, default=None, help="Triton client concurrency (default 1,2,4,8)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for torch and ORT (default: usable CPUs)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None, help="minimum seconds of timed calls per row")
    p.add_argument("--max-time", type=float, default=None, help="maximum seconds of timed calls per row")
    p.add_argument("--work", type=Path, default=None, help="keep scratch (checkpoint, exports, Triton repository) here instead of a temp dir")
    p.add_argument("--cache", type=Path, default=Path("build/bench-cache"),
                   help="reuse exports made earlier from the same checkpoint weights, K and export code (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="export afresh into the scratch dir")
    p.add_argument("--encoders", choices=("tiny", "htsat-tiny"), default=None,
                   help="CLAP encoder architecture to export (random weights; default htsat-tiny, tiny with --quick)")
    p.add_argument("--search-sizes", type=_ints, default=None,
                   help="gallery sizes N of the search group (default 10000,100000,200000,1000000; 1000,4000 with --quick)")
    p.add_argument("--lean-size", type=int, default=None,
                   help="gallery size N of the lean group (default 100000; 2000 with --quick)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _context(args: argparse.Namespace, work: Path) -> Context:
    sizes = QUICK if args.quick else FULL
    policy = TimingPolicy(warmup=1, repeats=3, min_time_s=0.0, max_time_s=2.0) if args.quick else TimingPolicy()
    policy = TimingPolicy(
        warmup=args.warmup if args.warmup is not None else policy.warmup,
        repeats=args.repeats if args.repeats is not None else policy.repeats,
        min_time_s=args.min_time if args.min_time is not None else policy.min_time_s,
        max_time_s=args.max_time if args.max_time is not None else policy.max_time_s,
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Context(
        preset=args.preset or ("clap-tiny" if args.quick else "clap-512"),
        quick=args.quick,
        steps=args.steps or sizes["steps"],
        batches=args.batches or sizes["batches"],
        encoder_batches=sizes["encoder_batches"],
        pipeline_batches=sizes["pipeline_batches"],
        concurrency=args.concurrency or sizes["concurrency"],
        policy=policy,
        threads=args.threads or usable,
        work=work,
        cache=None if args.no_cache else args.cache,
        encoders=args.encoders,
    )


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmarks(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from . import prepare, roofline
    from .report import write_all

    started = time.time()
    tmp = None
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        work = args.work
    else:
        tmp = tempfile.mkdtemp(prefix="diffgap-bench-")
        work = Path(tmp)
    try:
        ctx = _context(args, work)
        groups = args.only
        machine = machine_record(ctx.threads)
        machine["loadavg_start"] = _loadavg()
        res: dict[str, Any] = {
            "schema": SCHEMA,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine,
            "settings": {
                "preset": ctx.preset, "quick": ctx.quick, "groups": list(groups), "steps": list(ctx.steps),
                "batches": list(ctx.batches), "encoder_batches": list(ctx.encoder_batches),
                "pipeline_batches": list(ctx.pipeline_batches), "concurrency": list(ctx.concurrency),
                "threads": ctx.threads, "policy": ctx.policy.to_dict(), "direction": ctx.direction,
                "export_dirs": [str(d) for d in args.export_dir or []],
                "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            },
            "rows": [], "triton": [], "notes": ctx.notes, "knob_notes": [],
        }
        la = machine["loadavg_start"]
        if la and la[0] > 0.5 * ctx.threads:
            res["load_warning"] = (f"load average {la[0]} at start on {ctx.threads} usable CPUs: other processes compete for "
                                   "the cores, so these timings are pessimistic and noisier than on an idle machine")
            log.warning(res["load_warning"])
        log.info("machine: %s", machine_summary(machine))

        ctx.roofline = roofline.measure_machine(ctx.threads, quick=ctx.quick)
        res["roofline"] = ctx.roofline

        needs_model = set(groups) & {"denoiser", "encoders", "pipeline", "triton", "knobs", "search", "lean"}
        if needs_model:
            prepare.prepare(ctx, groups, export_dirs=args.export_dir, checkpoint=args.checkpoint)
            res["settings"]["main_steps"] = ctx.main_steps
            res["settings"]["exports"] = {"main": str(ctx.main_export) if ctx.main_export else None,
                                          **{f"K={k}": str(v) for k, v in sorted(ctx.exports.items())}}
            res["settings"]["parameters"] = ctx.model.parameter_counts() if ctx.model is not None else None

        if "denoiser" in groups:
            from . import denoiser

            res["rows"] += [r.to_dict() for r in denoiser.run(ctx)]
        if "encoders" in groups:
            from . import encoders

            res["rows"] += [r.to_dict() for r in encoders.run(ctx)]
        if "pipeline" in groups:
            from . import pipeline

            res["rows"] += [r.to_dict() for r in pipeline.run(ctx)]
        if "knobs" in groups:
            from . import knobs

            k = GOAL_STEPS if GOAL_STEPS in ctx.steps else ctx.steps[len(ctx.steps) // 2]
            bs = tuple(sorted({GOAL_SPEEDUP_BATCH if GOAL_SPEEDUP_BATCH in ctx.batches else min(ctx.batches),
                               GOAL_ROOFLINE_BATCH if GOAL_ROOFLINE_BATCH in ctx.batches else max(ctx.batches)}))
            res["rows"] += [r.to_dict() for r in knobs.run(ctx, k, bs)]
            res["knob_notes"] += knob_notes(res)
        if "search" in groups:
            from . import search

            res["search"] = search.run(ctx, args.search_sizes)
            res["settings"]["search_sizes"] = res["search"]["sizes"]
        if "lean" in groups:
            from . import lean

            res["lean"] = lean.run(ctx, args.lean_size)
        if "generation" in groups:
            from . import generation

            res["generation"] = generation.run(ctx)
        if "train-step" in groups:
            from . import train_step

            res["train_step"] = train_step.run(ctx)
        if "triton" in groups:
            from . import serving

            res["triton"].append(_triton(serving, ctx, None, "default"))
            res["knob_notes"] += serving_knobs(serving, ctx, res)
            from . import serving_load

            res["serving_load"] = serving_load.run_load(ctx)

        ctx.roofline["peak_end"] = roofline.measure_peak_gflops(n=1024 if ctx.quick else 2048, repeats=3 if ctx.quick else 10, threads=ctx.threads)
        machine["loadavg_end"] = _loadavg()
        res["wall_s"] = round(time.time() - started, 1)
        host = platform.node().split(".")[0] or "host"
        stem = f"{host}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}" + ("-quick" if ctx.quick else "")
        files = write_all(res, args.out, stem, work=work)
        return res, files
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _triton(serving, ctx: Context, options: dict[str, Any] | None, label: str, ensembles=None) -> dict[str, Any]:
    try:
        return serving.run(ctx, options, label, ensembles)
    except Exception as e:  # the server or repository failing is a recorded result
        log.warning("triton (%s) not measured: %s: %s", label, type(e).__name__, e)
        return {"label": label, "repository_options": options or {}, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "runs": []}


def knob_notes(res: dict[str, Any]) -> list[str]:
    """Per goal-row batch: the best ORT variant vs the runtime default, and ORT's best vs eager's best."""
    notes = []
    knobs = [r for r in res["rows"] if r["group"] == "knobs" and r["status"] == "ok"]
    for b in sorted({r["batch"] for r in knobs}):
        ort = [r for r in knobs if r["batch"] == b and r["backend"] == "ort-cpu"]
        eager = [r for r in knobs if r["batch"] == b and r["backend"] == "torch-eager"]
        base = next((r for r in ort if r["extra"]["variant"] == "runtime-wrapper"), None)
        if not ort or base is None:
            continue
        best = min(ort, key=lambda r: r["stats"]["median_ms"])
        line = (f"B={b}, K={best['steps']}: best ORT setting `{best['extra']['variant']}` {best['stats']['median_ms']:.3g} ms vs "
                f"the runtime default {base['stats']['median_ms']:.3g} ms ({base['stats']['median_ms'] / best['stats']['median_ms']:.2f}x)")
        # the grid's own eager row (default threads) is one more eager setting, timed separately
        eager += [r for r in res["rows"] if r["group"] == "denoiser" and r["backend"] == "torch-eager" and r["status"] == "ok"
                  and r["batch"] == b and r["steps"] == best["steps"]]
        if eager:
            be = min(eager, key=lambda r: r["stats"]["median_ms"])
            line += (f"; best eager setting `{be['extra'].get('variant', 'default (grid row)')}` {be['stats']['median_ms']:.3g} ms, so best-vs-best "
                     f"ORT is {be['stats']['median_ms'] / best['stats']['median_ms']:.2f}x eager")
        notes.append(line)
    return notes


def serving_knobs(serving, ctx: Context, res: dict[str, Any]) -> list[str]:
    """If dynamic batching missed its goal, rerun the ensembles once with a longer batching window."""
    from .report import goal_rows

    goals = [g for g in goal_rows(res) if g["goal"].startswith("dynamic batching")]
    if not goals or all(g["met"] is not False for g in goals):
        return []
    options = serving.batching_knob(ctx)
    if options is None:
        return ["dynamic batching goal missed; the repository generator exposes no batching setting to try"]
    t = _triton(serving, ctx, options, "batching-knob", serving.ENSEMBLES[:1])
    res["triton"].append(t)
    return [f"dynamic batching goal missed with the default repository; re-ran with {options} (second Triton table)"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # laion-clap/transformers hang for minutes otherwise
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for d in args.export_dir or []:
        if not (d / "manifest.json").is_file():
            print(f"benchmarks: error: {d} is not an export directory (no manifest.json); make one with `diffgap export`",
                  file=sys.stderr)
            return 2
    from diffgap.config import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        print(f"benchmarks: error: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"benchmarks: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        print(f"benchmarks: error: checkpoint {args.checkpoint} is not a directory; pass a `diffgap train` output", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"benchmarks: error: cannot create --out {args.out} ({e}); choose a writable directory", file=sys.stderr)
        return 2
    res, files = run_benchmarks(args)
    from .report import markdown

    print(markdown(res))
    print(f"wrote {files['json']}, {files['markdown']} and {len(files['plots'])} plot(s)")
    return 0
