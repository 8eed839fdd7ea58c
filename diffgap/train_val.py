"""Validation-driven training (``diffgap train --val``): early stopping, best-weight selection and
the two-stage schedule.

Why: a fixed step budget tuned on one benchmark under-trains the contrastive heads on another and
over-trains the denoisers (they memorise the train split). Here the budget comes from the
validation split, and heads and denoisers get budgets of their own.

Schedules (``train.schedule``):

* ``two-stage``: (1) the heads alone, symmetric InfoNCE, early-stopped on the head criterion; the
  best weights are kept and frozen; the head-space statistics are then computed exactly over the
  whole train split. (2) the denoisers on the frozen space (head embeddings precomputed once),
  early-stopped on the bridge criterion. The heads' gradient in the joint loss is the same InfoNCE
  (the diffusion terms are detached), so stage 1 is the joint run's head training without the
  denoisers' cost, and stage 2 models a space that no longer moves.
* ``joint``: the DiffGAP loss of :func:`diffgap.train.diffgap_loss`, one budget for both, early-stopped
  on the combined score.
* ``auto`` (default): trains both and keeps the one with the higher combined validation score;
  both candidates' figures and the reason are recorded in the checkpoint's ``meta.validation``.

Heads (both schedules): the config's heads (``heads.hidden``, linear by default) and, when
``train.head_mlp_hidden`` > 0, heads with a residual MLP of that width are each trained alone from the
same seeded start (stage 1 above). The MLP heads are kept only if their
validation head R@1 is higher with a paired bootstrap 95% interval above zero (both directions'
queries pooled; ties and noise keep the simpler heads). The two-stage schedule continues from the kept heads; the joint one starts from scratch with
their architecture. The candidates' figures and the reason are in ``meta.validation.heads``.

Criteria, all on the EMA weights and the first ``train.val_max_pairs`` validation pairs:

* head R@1: mean over both retrieval directions (a->b, b->a) of R@1 of head-space cosine;
* bridge R@1: mean over both directions of R@1 of the query-side bridge (the config's bridge mode,
  K = ``diffusion.sample_steps``, one sample from fixed noise) scored against the gallery's head
  embeddings -- the cheap bridge-quality figure;
* combined score: (head R@1 + bridge R@1) / 2.

Validation every ``val_every`` steps (heads: ``head_val_every``). Learning rate: linear warm-up,
then constant; after ``patience`` (heads: ``head_patience``) evaluations without a new best it
is multiplied by ``plateau_factor`` (ReduceLROnPlateau), at most ``plateau_decays`` times (heads:
``head_plateau_decays``); the next plateau ends the stage. The weights returned are those of the best evaluation, not the last.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .config import DiffGAPConfig, TrainConfig
from .core.data import Pairs
from .core.retrieval import cosine, metrics_from_ranks, ranks_of_diagonal
from .models import DiffGAP, parse_direction
from .train import denoiser_loss, diffgap_loss, ema_update, info_nce, make_optimizer

log = logging.getLogger(__name__)

CRITERIA = {
    "heads": "mean over both directions of validation R@1 in head space",
    "denoisers": "mean over both directions of validation R@1 of the query-side bridge (config bridge mode, K = sample_steps, one sample)",
    "joint": "(head R@1 + bridge R@1) / 2 on validation",
}


# ---- validation figures -------------------------------------------------------------------------
def _r1(q: np.ndarray, g: np.ndarray) -> float:
    return metrics_from_ranks(ranks_of_diagonal(cosine(q, g)))["R@1"]


@torch.no_grad()
def head_ranks(model: DiffGAP, X: dict[str, torch.Tensor]) -> np.ndarray:
    """(2N,) ranks of the true partner in head space, both directions (a->b rows, then b->a)."""
    was_training = model.training
    model.eval()
    a, b = model.config.modalities
    h = {m: model.project(m, X[m]).numpy() for m in (a, b)}
    model.train(was_training)
    return np.concatenate([ranks_of_diagonal(cosine(h[q], h[g])) for q, g in ((a, b), (b, a))])


@torch.no_grad()
def validate(model: DiffGAP, X: dict[str, torch.Tensor], noise: torch.Tensor, bridge: bool = True) -> dict[str, Any]:
    """Head R@1 per task and (``bridge``) bridge R@1 per direction on the pairs ``X[m]: (N, E)``;
    ``noise: (N, D)`` is the bridges' fixed initial noise."""
    was_training = model.training
    model.eval()
    a, b = model.config.modalities
    h = {m: model.project(m, X[m]).numpy() for m in (a, b)}
    rep: dict[str, Any] = {"head": {f"{q}->{g}": _r1(h[q], h[g]) for q, g in ((a, b), (b, a))}}
    if bridge:
        rep["bridge"] = {}
        for direction in model.config.directions:
            target, source = parse_direction(direction)
            y = model.bridge(direction, X[source], noise).numpy()
            rep["bridge"][direction] = _r1(y, h[target])
    rep["head_r1"] = float(np.mean(list(rep["head"].values())))
    if bridge:
        rep["bridge_r1"] = float(np.mean(list(rep["bridge"].values())))
        rep["score"] = 0.5 * (rep["head_r1"] + rep["bridge_r1"])
    model.train(was_training)
    return rep


# ---- one early-stopped stage ------------------------------------------------------------------------
@dataclass
class StageResult:
    name: str
    steps: int                      # steps run
    best_step: int
    best: dict[str, Any]            # validation report at best_step
    lr_decays: int
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)  # (step, criterion, lr) per evaluation

    def summary(self) -> dict[str, Any]:
        return {"steps_run": self.steps, "best_step": self.best_step, "best": self.best, "lr_decays": self.lr_decays,
                "seconds": round(self.seconds, 1), "criterion": CRITERIA[self.name], "curve": self.curve}


def run_stage(
    name: str, model: DiffGAP, ema: DiffGAP, params: list[torch.nn.Parameter], tcfg: TrainConfig,
    loss_fn: Callable[[int], torch.Tensor], val_fn: Callable[[DiffGAP], dict[str, Any]], key: str,
    max_steps: int, progress: bool = False,
) -> StageResult:
    """Optimise ``params`` of ``model`` with ``loss_fn(step)``, EMA into ``ema``, validate ``ema`` with
    ``val_fn`` every ``tcfg.val_every`` steps (``head_val_every`` for the ``"heads"`` stage) on ``report[key]``; on return ``ema`` (and ``model``)
    hold the best evaluation's weights."""
    from diffgap.core.progress import progress_bar

    every, patience, max_decays = ((tcfg.head_val_every, tcfg.head_patience, tcfg.head_plateau_decays) if name == "heads"
                                   else (tcfg.val_every, tcfg.patience, tcfg.plateau_decays))
    holder = torch.nn.Module()
    holder.params = torch.nn.ParameterList(params)
    opt = make_optimizer(holder, tcfg)
    t0 = time.perf_counter()
    best_score, best_step, best_rep, best_state = -1.0, 0, None, None
    since, decays, lr_scale = 0, 0, 1.0
    curve: list[dict[str, float]] = []
    step = 0
    bar = progress_bar(total=max_steps, disable=not progress, desc=f"train {name}", dynamic_ncols=True)
    while step < max_steps:
        lr = tcfg.lr * lr_scale * min(1.0, (step + 1) / tcfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        ema_update(ema, model, min(tcfg.ema_decay, (1.0 + step) / (10.0 + step)))
        step += 1
        bar.update(1)
        if step % every and step < max_steps:
            continue
        rep = val_fn(ema)
        score = float(rep[key])
        curve.append({"step": step, key: round(score, 2), "lr": lr})
        bar.set_postfix({key: f"{score:.1f}", "best": f"{max(best_score, score):.1f}"})
        if score > best_score:
            best_score, best_step, best_rep, since = score, step, rep, 0
            best_state = copy.deepcopy(ema.state_dict())
            continue
        since += 1
        if since >= patience:
            if decays >= max_decays:
                break
            decays += 1
            lr_scale *= tcfg.plateau_factor
            since = 0
            log.info("%s: no better validation %s for %d evaluations, lr x%.2f", name, key, patience, tcfg.plateau_factor)
    bar.close()
    assert best_state is not None
    ema.load_state_dict(best_state)
    model.load_state_dict(best_state)
    log.info("%s: best %s %.2f at step %d of %d", name, key, best_score, best_step, step)
    return StageResult(name, step, best_step, best_rep, decays, time.perf_counter() - t0, curve)


# ---- schedules ---------------------------------------------------------------------------------
def _sampler(n: int, batch: int, gen: torch.Generator) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, n, (batch,), generator=gen)


@torch.no_grad()
def _set_exact_stats(model: DiffGAP, H: dict[str, torch.Tensor]) -> None:
    """Head-space statistics over the whole train split (the frozen space the denoisers model)."""
    for m, h in H.items():
        mean, std = model._stats(m)
        mean.copy_(h.mean(0))
        std.copy_(h.std(0, unbiased=True).clamp_min(1e-4))
    model.stats_updates.fill_(1)


def _seeded_start(cfg: DiffGAPConfig, n: int) -> tuple[DiffGAP, torch.Generator, Callable[[], torch.Tensor]]:
    """A freshly initialised model, the batch generator and its index sampler, all from ``train.seed``
    (both schedules start from the same weights and draw the same batches)."""
    torch.manual_seed(cfg.train.seed)
    model = DiffGAP(cfg)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000003)
    return model, gen, _sampler(n, cfg.train.batch_size, gen)


@dataclass
class HeadsStart:
    """Stage 1's outcome: the model with its best heads, and the batch stream to continue with."""

    model: DiffGAP
    gen: torch.Generator
    idx: Callable[[], torch.Tensor]
    stage: StageResult


def train_heads(cfg: DiffGAPConfig, X: dict[str, torch.Tensor], val_fn, progress: bool) -> HeadsStart:
    """Stage 1: the heads alone (symmetric InfoNCE), early-stopped on head R@1; denoisers untouched."""
    tcfg = cfg.train
    a, b = cfg.modalities
    model, gen, idx = _seeded_start(cfg, len(X[a]))

    def head_loss(step: int) -> torch.Tensor:
        i = idx()
        return info_nce(model.project(a, X[a][i]), model.project(b, X[b][i]), model.heads.scale())

    for p in model.denoisers.parameters():
        p.requires_grad_(False)
    ema = copy.deepcopy(model)
    if cfg.heads.identity:  # raw-space model: no heads stage (the heads stay the identity)
        st = StageResult("heads", 0, 0, val_fn(model.eval(), bridge=False), 0, 0.0)
        model.train()
    else:
        st = run_stage("heads", model, ema, list(model.heads.parameters()), tcfg, head_loss,
                       lambda m: val_fn(m, bridge=False), "head_r1", tcfg.max_head_steps, progress)
    for p in model.denoisers.parameters():
        p.requires_grad_(True)
    return HeadsStart(model, gen, idx, st)


def head_candidates(cfg: DiffGAPConfig) -> list[int]:
    """Residual-MLP widths of the heads validation chooses among, simplest first (0 = linear)."""
    own, mlp = cfg.heads.hidden, cfg.train.head_mlp_hidden
    return [own] if mlp <= 0 or mlp == own else sorted({own, mlp})


def select_heads(cfg: DiffGAPConfig, X: dict[str, torch.Tensor], V: dict[str, torch.Tensor], val_fn,
                 progress: bool) -> tuple[DiffGAPConfig, HeadsStart, dict[str, Any]]:
    """Train every head candidate (stage 1); keep a more complex one only on a validated gain.

    Returns the config with the kept ``heads.hidden``, its stage-1 start and the record."""
    from .core.retrieval import bootstrap_ci

    tcfg = cfg.train
    widths = head_candidates(cfg)
    starts = {h: train_heads(cfg.replace(**{"heads.hidden": h}), X, val_fn, progress) for h in widths}
    ranks = {h: head_ranks(starts[h].model, V) for h in widths}
    chosen, gains = widths[0], {}
    for h in widths[1:]:
        lo, hi = bootstrap_ci(ranks[h], ranks[chosen], n_boot=1000, seed=tcfg.seed)
        gain = metrics_from_ranks(ranks[h])["R@1"] - metrics_from_ranks(ranks[chosen])["R@1"]
        gains[h] = {"vs": chosen, "val_gain_R@1": gain, "val_gain_ci": [lo, hi]}
        if lo > 0:
            chosen = h
    name = lambda h: "linear" if h == 0 else f"mlp-{h}"  # noqa: E731
    if len(widths) == 1:
        why = f"one candidate (train.head_mlp_hidden = {tcfg.head_mlp_hidden})"
    elif chosen == widths[0]:
        g = gains[widths[-1]]
        why = (f"{name(widths[-1])} heads gained {g['val_gain_R@1']:+.1f} validation head R@1, paired 95% CI "
               f"[{g['val_gain_ci'][0]:+.1f}, {g['val_gain_ci'][1]:+.1f}] (not above 0): kept the simpler {name(chosen)} heads")
    else:
        g = gains[chosen]
        why = (f"{name(chosen)} heads gained {g['val_gain_R@1']:+.1f} validation head R@1 over {name(g['vs'])}, "
               f"paired 95% CI [{g['val_gain_ci'][0]:+.1f}, {g['val_gain_ci'][1]:+.1f}] (above 0)")
    record = {"chosen": name(chosen), "hidden": chosen, "why": why, "comparisons": {name(h): v for h, v in gains.items()},
              "candidates": {name(h): {"val_head_r1": starts[h].stage.best["head_r1"], "stage": starts[h].stage.summary()}
                             for h in widths}}
    log.info("heads: %s", why)
    return cfg.replace(**{"heads.hidden": chosen}), starts[chosen], record


def train_two_stage(cfg: DiffGAPConfig, X: dict[str, torch.Tensor], val_fn, progress: bool,
                    start: HeadsStart | None = None, after_heads: Callable[[DiffGAP], Any] | None = None,
                    ) -> tuple[DiffGAP, dict[str, StageResult]]:
    """Stage 1 (unless ``start`` holds its outcome), then stage 2: the denoisers on the frozen heads.

    ``after_heads(model)`` is called once the heads are frozen and the head-space statistics set (what
    work on the fixed space may start from, e.g. :class:`diffgap.eval_controls.BackgroundControls`);
    an object it returns with a ``poll()`` method is polled every ``val_every`` denoiser steps."""
    tcfg = cfg.train
    a, b = cfg.modalities
    start = start or train_heads(cfg, X, val_fn, progress)
    model, gen, idx, st_heads = start.model, start.gen, start.idx, start.stage
    for p in model.heads.parameters():
        p.requires_grad_(False)
    for p in model.denoisers.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model.eval()
        H = {m: torch.cat([model.project(m, X[m][i:i + 4096]) for i in range(0, len(X[m]), 4096)]) for m in (a, b)}
        model.train()
    _set_exact_stats(model, H)
    side = after_heads(model) if after_heads is not None else None
    ema = copy.deepcopy(model)

    def diff_loss(step: int) -> torch.Tensor:
        if side is not None and step % tcfg.val_every == 0:
            side.poll()
        i = idx()
        return denoiser_loss(model, {m: H[m][i] for m in (a, b)}, gen)[0]

    st_den = run_stage("denoisers", model, ema, list(model.denoisers.parameters()), tcfg, diff_loss,
                       val_fn, "bridge_r1", tcfg.max_denoiser_steps, progress)
    for p in model.parameters():
        p.requires_grad_(True)
    best = dict(st_den.best)
    return ema.eval(), {"heads": st_heads, "denoisers": st_den, "_final": best}


def train_joint(cfg: DiffGAPConfig, X: dict[str, torch.Tensor], val_fn, progress: bool) -> tuple[DiffGAP, dict[str, StageResult]]:
    tcfg = cfg.train
    a, b = cfg.modalities
    model, gen, idx = _seeded_start(cfg, len(X[a]))

    def loss(step: int) -> torch.Tensor:
        i = idx()
        return diffgap_loss(model, {m: X[m][i] for m in (a, b)}, gen)[0]

    ema = copy.deepcopy(model)
    st = run_stage("joint", model, ema, list(model.parameters()), tcfg, loss, val_fn, "score",
                   tcfg.max_denoiser_steps, progress)
    return ema.eval(), {"joint": st, "_final": dict(st.best)}


def train_validated(cfg: DiffGAPConfig, data: Pairs, val: Pairs, progress: bool = True,
                    after_heads: Callable[[DiffGAP], Any] | None = None) -> tuple[DiffGAP, dict[str, Any]]:
    """Train with validation-driven budgets; returns (the chosen model, ``meta.validation`` record).
    ``after_heads``: see :func:`train_two_stage`."""
    tcfg = cfg.train
    a, b = cfg.modalities
    X = {m: torch.from_numpy(np.ascontiguousarray(data[m])) for m in (a, b)}
    nv = min(len(val), tcfg.val_max_pairs)
    V = {m: torch.from_numpy(np.ascontiguousarray(val[m][:nv])) for m in (a, b)}
    noise = torch.randn(nv, cfg.heads.dim, generator=torch.Generator().manual_seed(tcfg.seed + 17))

    def val_fn(model: DiffGAP, bridge: bool = True) -> dict[str, Any]:
        return validate(model, V, noise, bridge)

    schedules = ["two-stage", "joint"] if tcfg.schedule == "auto" else [tcfg.schedule]
    if cfg.heads.identity:  # nothing to train jointly with the heads frozen
        schedules = ["two-stage"]
    cfg, start, heads_record = select_heads(cfg, X, V, val_fn, progress)
    runs: dict[str, tuple[DiffGAP, dict[str, StageResult]]] = {}
    for s in schedules:
        runs[s] = (train_two_stage(cfg, X, val_fn, progress, start, after_heads) if s == "two-stage"
                   else train_joint(cfg, X, val_fn, progress))
    scores = {s: runs[s][1]["_final"]["score"] for s in schedules}
    chosen = max(schedules, key=lambda s: (scores[s], s == "two-stage"))
    if len(schedules) == 1:
        why = f"train.schedule = {tcfg.schedule!r} (no comparison run)"
    else:
        other = next(s for s in schedules if s != chosen)
        why = (f"higher combined validation score: {chosen} {scores[chosen]:.2f} vs {other} {scores[other]:.2f} "
               f"({CRITERIA['joint']}; ties go to two-stage, the cheaper to retrain)")
    record = {
        "n_val_pairs": nv, "schedule_setting": tcfg.schedule, "chosen": chosen, "why": why, "heads": heads_record,
        "criteria": CRITERIA,
        "candidates": {s: {"final": runs[s][1]["_final"],
                           "stages": {k: v.summary() for k, v in runs[s][1].items() if k != "_final"}}
                       for s in schedules},
    }
    model = runs[chosen][0]
    model.eval()
    return model, record
