"""The ``train-step`` group: the cost of one training step of the default preset, two optimiser
and EMA implementations side by side in one run.

Model: ``diffgap.config.DEFAULT_PRESET`` with random weights (timings do not depend on the weight
values); data: random unit-norm embeddings of the preset's input widths, ``train.batch_size`` rows
per step drawn from a seeded pool, as training draws its batches. Each stage's step is the one
``diffgap.train_val.run_stage`` runs: set the learning rate, loss, ``zero_grad``, backward,
``clip_grad_norm_`` (``train.grad_clip``), optimiser step, EMA update of the whole model.

* ``denoisers`` -- the second stage of ``train_two_stage``: ``diffgap.train.denoiser_loss`` on
  head-space embeddings precomputed by the frozen heads; the denoisers' parameters are optimised.
* ``heads`` -- the first stage (``train_heads``): symmetric InfoNCE (``diffgap.train.info_nce``) on
  the heads' outputs; the heads' parameters are optimised, the denoisers frozen.

Variants, each on its own copy of the same model with its own equally seeded batch stream, so both
do the same arithmetic:

* ``foreach-off`` -- torch's AdamW with ``foreach=False`` (the per-tensor loop, what torch picks by
  default for CPU tensors) and a per-parameter ``lerp_`` EMA loop: what the package ran before;
* ``package`` -- ``diffgap.train.make_optimizer`` and ``diffgap.train.ema_update`` as they are now.

The variants take turns step by step (one round = one step of each), so a change in the machine's
load hits both alike; medians, p90, steps/s, the ratio of medians and the median of the per-round
ratios are reported. After timing, the largest parameter difference between the two copies checks
that they did the same updates.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .harness import Stats, TimingPolicy

log = logging.getLogger("benchmarks")

VARIANTS = {
    "foreach-off": "torch AdamW foreach=False (per-tensor loop) + per-parameter lerp_ EMA",
    "package": "diffgap.train.make_optimizer (fused AdamW) + diffgap.train.ema_update (torch._foreach_lerp_)",
}
STAGES = ("denoisers", "heads")
POOL_BATCHES = 8  # the pool holds this many batches of random embeddings


def _unit(n: int, d: int, gen) -> Any:
    import torch

    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)


def _loop_optimizer(holder, tcfg):
    """AdamW as the package built it before: the same parameter groups, torch's per-tensor loop."""
    import torch

    decay = [p for p in holder.parameters() if p.ndim >= 2]
    no_decay = [p for p in holder.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(0.9, 0.999), foreach=False, fused=False,
    )


def _loop_ema(ema, model, decay: float) -> None:
    """The EMA update as the package ran it before: one ``lerp_`` per parameter."""
    import torch

    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def _stage_step(stage: str, base, X: dict[str, Any], variant: str, seed: int) -> tuple[Callable[[], float], Any]:
    """One training step of ``stage`` on a fresh copy of ``base`` with ``variant``'s optimiser and EMA;
    returns (step function -> loss, the trained model)."""
    import torch

    from diffgap.train import denoiser_loss, ema_update, info_nce, make_optimizer

    model = copy.deepcopy(base).train()
    cfg = model.config
    tcfg = cfg.train
    a, b = cfg.modalities
    n = len(X[a])
    gen = torch.Generator().manual_seed(seed)
    if stage == "heads":  # train_heads: the heads alone, the denoisers frozen
        trained, frozen = model.heads, model.denoisers
    else:                 # train_two_stage, stage 2: the denoisers on the frozen heads
        trained, frozen = model.denoisers, model.heads
    for p in frozen.parameters():
        p.requires_grad_(False)
    for p in trained.parameters():
        p.requires_grad_(True)
    params = list(trained.parameters())
    if stage == "denoisers":
        with torch.no_grad():
            model.eval()
            H = {m: model.project(m, X[m]) for m in (a, b)}  # (N, D): the frozen heads' embeddings
            model.train()
    ema = copy.deepcopy(model)
    holder = torch.nn.Module()  # run_stage optimises a ParameterList of the stage's parameters
    holder.params = torch.nn.ParameterList(params)
    if variant == "package":
        opt, ema_fn = make_optimizer(holder, tcfg), ema_update
    else:
        opt, ema_fn = _loop_optimizer(holder, tcfg), _loop_ema

    def loss_fn() -> torch.Tensor:
        i = torch.randint(0, n, (tcfg.batch_size,), generator=gen)
        if stage == "heads":
            return info_nce(model.project(a, X[a][i]), model.project(b, X[b][i]), model.heads.scale())
        return denoiser_loss(model, {m: H[m][i] for m in (a, b)}, gen)[0]

    def step() -> float:
        for g in opt.param_groups:
            g["lr"] = tcfg.lr
        loss = loss_fn()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        ema_fn(ema, model, tcfg.ema_decay)
        return float(loss.detach())

    return step, model


def _alternate(fns: dict[str, Callable[[], float]], policy: TimingPolicy) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each function, the functions taking turns call by call (the order flipped
    each round): ``policy.warmup``
    untimed rounds, then rounds until ``policy.repeats`` rounds and ``policy.min_time_s`` have passed,
    or ``policy.max_time_s`` (never fewer than 3 rounds). Returns the samples and each last loss."""
    last: dict[str, float] = {}
    for _ in range(max(1, policy.warmup)):
        for k, fn in fns.items():
            last[k] = fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    order = list(fns)
    while True:
        for k in order:
            fn = fns[k]
            t0 = time.perf_counter()
            last[k] = fn()
            samples[k].append(time.perf_counter() - t0)
        order.reverse()  # neither goes first every round
        rounds, el = len(samples[order[0]]), time.perf_counter() - start
        if rounds >= 3 and el >= policy.max_time_s:
            break
        if rounds >= policy.repeats and el >= policy.min_time_s:
            break
    return samples, last


def _max_diff(m1, m2) -> float:
    return max(float((p1 - p2).abs().max()) for p1, p2 in zip(m1.parameters(), m2.parameters()))


def _policy(ctx: Any) -> TimingPolicy:
    """The run's policy with at least 30 rounds (steps are tens to hundreds of ms: a median of 30 is cheap)."""
    p = ctx.policy
    return p if ctx.quick else TimingPolicy(warmup=max(p.warmup, 5), repeats=max(p.repeats, 30), min_time_s=p.min_time_s,
                                            max_time_s=p.max_time_s, max_warmup_s=p.max_warmup_s)


def run(ctx: Any) -> dict[str, Any]:
    import torch

    from diffgap.config import DEFAULT_PRESET, get_preset
    from diffgap.models import DiffGAP

    torch.set_num_threads(ctx.threads)
    cfg = get_preset(DEFAULT_PRESET)
    tcfg = cfg.train
    policy = _policy(ctx)
    torch.manual_seed(tcfg.seed)
    base = DiffGAP(cfg)
    gen = torch.Generator().manual_seed(tcfg.seed)
    n = POOL_BATCHES * tcfg.batch_size
    X = {m: _unit(n, cfg.input_dim(m), gen) for m in cfg.modalities}
    res: dict[str, Any] = {
        "preset": DEFAULT_PRESET, "quick": bool(ctx.quick), "batch_size": tcfg.batch_size,
        "denoiser_batch_size": tcfg.denoiser_batch_size, "input_dims": cfg.input_dims, "head_dim": cfg.heads.dim,
        "parameters": base.parameter_counts(), "pool_rows": n, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "policy": policy.to_dict(), "variants": dict(VARIANTS),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "rows": [],
    }
    for stage in STAGES:
        try:
            built = {v: _stage_step(stage, base, X, v, seed=tcfg.seed + 1) for v in VARIANTS}
            samples, last = _alternate({v: fn for v, (fn, _) in built.items()}, policy)
            models = {v: m for v, (_, m) in built.items()}
            trained = models["package"].heads if stage == "heads" else models["package"].denoisers
            before = base.heads if stage == "heads" else base.denoisers
            row: dict[str, Any] = {
                "stage": stage, "trained_parameters": int(sum(p.numel() for p in trained.parameters())),
                "max_param_diff": _max_diff(models["foreach-off"], models["package"]),
                "max_param_change": _max_diff(trained, before), "variants": {},
            }
            for v, s in samples.items():
                st = Stats.from_samples(s)
                row["variants"][v] = {**st.to_dict(), "steps_per_s": 1e3 / st.median_ms, "last_loss": last[v],
                                      "samples_ms": [round(1e3 * x, 2) for x in s]}  # in round order: stalls show
            a_, b_ = (np.asarray(samples[v]) for v in VARIANTS)
            row["ratio"] = row["variants"]["foreach-off"]["median_ms"] / row["variants"]["package"]["median_ms"]
            row["paired_ratio"] = float(np.median(a_ / b_))
            log.info("train-step %s: %.4g ms (foreach-off) vs %.4g ms (package), %.2fx", stage,
                     row["variants"]["foreach-off"]["median_ms"], row["variants"]["package"]["median_ms"], row["ratio"])
        except Exception as e:  # a failure is a recorded result
            log.warning("train-step %s not measured: %s: %s", stage, type(e).__name__, e)
            row = {"stage": stage, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        res["rows"].append(row)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


# ---- report ------------------------------------------------------------------------------------
def markdown(res: dict[str, Any] | None) -> list[str]:
    if not res:
        return []
    p = res["policy"]
    out = ["## Training step: optimiser and EMA implementations", "",
           f"One training step of `{res['preset']}` (random weights; random unit-norm embeddings of widths "
           f"{res['input_dims']}, batch {res['batch_size']} rows, the denoisers' terms on the first "
           f"{res['denoiser_batch_size']}), torch {res['torch_version']}, {res['torch_threads']} torch threads. A step: "
           "loss, backward, gradient clipping, optimiser step, EMA update of the whole model. Variants: "
           + "; ".join(f"`{k}` = {v}" for k, v in res["variants"].items())
           + f". The two take turns step by step ({p['warmup']} warm-up rounds, then at least {p['repeats']} rounds). "
           f"Load average {res['loadavg_start']} at start, {res['loadavg_end']} at end.", ""]
    head = ["stage", "trained params", "variant", "median ms", "p90 ms", "steps/s", "steps timed", "foreach-off / package",
            "max param diff"]
    body = []
    for r in res["rows"]:
        if "error" in r:
            body.append([r["stage"], "", "failed", "", "", "", "", "", r["error"][:80]])
            continue
        for v, x in r["variants"].items():
            ratio = f"{r['ratio']:.2f}x (paired {r['paired_ratio']:.2f}x)" if v == "package" else ""
            diff = f"{r['max_param_diff']:.1e}" if v == "package" else ""
            body.append([r["stage"], f"{r['trained_parameters']:,}", v, f"{x['median_ms']:.4g}", f"{x['p90_ms']:.4g}",
                         f"{x['steps_per_s']:.3g}", str(x["n"]), ratio, diff])
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body]
    out += ["", "'paired': the median of the per-round ratios. 'max param diff': the largest difference between the "
            "two copies' parameters after the same steps (float rounding only: both did the same updates).", ""]
    return out


def plot(res: dict[str, Any] | None, path: Path) -> bool:
    """Median ms per step (p90 as the error bar), per stage, the two variants side by side."""
    rows = [r for r in (res or {}).get("rows", []) if "error" not in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .harness import save_png

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(rows))
    for i, v in enumerate(VARIANTS):
        med = np.asarray([r["variants"][v]["median_ms"] for r in rows])
        p90 = np.asarray([r["variants"][v]["p90_ms"] for r in rows])
        bars = ax.bar(x + (i - 0.5) * 0.38, med, 0.38, yerr=[np.zeros_like(med), p90 - med], capsize=3, label=v)
        ax.bar_label(bars, fmt="%.3g", fontsize=8, label_type="center")
    ax.set_xticks(x, [f"{r['stage']} ({r['ratio']:.2f}x)" for r in rows])
    ax.set_ylabel("ms per training step (median, bar to p90)")
    ax.set_title(f"{res['preset']} training step, {res['torch_threads']} torch threads", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    return True
