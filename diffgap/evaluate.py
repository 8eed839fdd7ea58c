"""Retrieval evaluation of a trained DiffGAP model: the ablation table, the condition-usage table
and sample sanity statistics.

Text-to-audio (T2A) and audio-to-text (A2T), on a paired test split, for every row:

* ``raw``            cosine of the frozen CLAP embeddings
* ``heads``          cosine in the contrastive (head) space
* ``raw+heads``      fusion of the two (the strongest system without a bridge)
* ``q-bridge``       query-side retrieval bridge: the query bridged into the gallery's modality with
  the model config's bridge (default: K = 1 from noise, the denoiser's posterior mean), one sample
  -- exactly what an export runs -- scored against the gallery's head embeddings
* ``g-bridge``       gallery-side retrieval bridge: each gallery item bridged into the query
  modality (precomputable at index time), scored against the query's head embedding
* ``q-bridge src``   diagnostic: query-side bridge from the source noised to t0 (``source_steps``)
* ``q-bridge noise`` diagnostic: query-side K-step DDIM samples from noise (``noise_steps``),
  averaged over ``noise_samples`` -- the generative sampler
* ``g-bridge src`` / ``g-bridge noise``: their gallery-side counterparts
* ``full``           fusion of raw + heads + ``q-bridge`` + ``g-bridge``; nothing else: the controls
  below are never fusion terms of ``full``. Its bridge weights are kept only if they beat
  ``raw+heads`` on validation with a paired-bootstrap interval above zero; otherwise ``full`` falls
  back to the raw+heads weights (recorded in the JSON)

Controls, when the training split is given (:mod:`diffgap.eval_controls`): ``linear adapter``,
``mean shift`` (Liang et al. 2022), ``regression bridge`` (deterministic MLP, the denoiser's size)
and ``raw+heads+reg`` (the ``full`` fusion with the regression bridge in place of the diffusion
bridge), the margins of ``full`` over the best control and over the best non-diffusion row (the
diffusion module's own share), and the generative-prior table (:mod:`diffgap.prior`).

Fusion = weighted sum of per-query z-scored similarities; weights are grid-searched on the
validation split only. Every R@1 carries a 95% percentile-bootstrap interval over test queries,
and the contribution rows (``full - raw+heads`` ...) are *paired* bootstrap intervals.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .core.data import Pairs
from .core.names import RUNTIME_SAMPLES
from .models import DiffGAP, parse_direction
from .core.retrieval import (bootstrap_ci, choose_fusion_weights, cosine, fuse, metrics_from_ranks,
                        ranks_of_diagonal)

log = logging.getLogger(__name__)

# Sanity tolerances for bridged samples vs real target-modality head embeddings:
# mean pairwise cosine within 0.05 (absolute), and the per-dimension mean within a quarter of
# the real per-dimension spread (RMS over dims) -- a shift smaller than that cannot move
# cosine rankings much, a larger one would mean the bridge lands off the target distribution.
TOL_MEAN_PAIRWISE_COS = 0.05
TOL_MEAN_SHIFT_OVER_STD = 0.25


@dataclass
class EvalConfig:
    bridge_steps: int | None = None    # K of the retrieval bridge (``q-bridge``, ``full``; None: model config)
    source_steps: int = 4              # K for the diagnostic bridge from the noised source
    noise_steps: int = 10              # K for bridging from noise
    noise_samples: int = 4             # samples averaged when bridging from noise (averaging lowers each query's sampling noise)
    source_samples: int = 1
    guidance_scale: float | None = None
    fusion_step: float = 0.1           # fusion weight grid on the simplex
    n_boot: int = 1000
    usage_buckets: int = 10            # timestep buckets of the condition-usage table
    seed: int = 0
    batch_size: int = 1000


# ---- embedding a split ------------------------------------------------------------------------
@torch.no_grad()
def _project(model: DiffGAP, modality: str, x: np.ndarray, bs: int) -> np.ndarray:
    return torch.cat([model.project(modality, torch.from_numpy(x[i:i + bs])) for i in range(0, len(x), bs)]).numpy()


@torch.no_grad()
def bridge_array(
    model: DiffGAP, direction: str, cond: np.ndarray, mode: str, steps: int, samples: int,
    seed: int, guidance_scale: float | None, bs: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Bridge every row of ``cond`` (N, E). Returns (mean of ``samples`` bridges re-normalised (N, D),
    the first sample alone (N, D), seconds per 1,000 queries)."""
    D = model.config.heads.dim
    outs = []
    t0 = time.perf_counter()
    for s in range(samples):
        g = torch.Generator().manual_seed(seed * 1009 + s)
        noise = torch.randn(len(cond), D, generator=g)
        parts = [
            model.bridge(direction, torch.from_numpy(cond[i:i + bs]), noise[i:i + bs], steps=steps,
                         guidance_scale=guidance_scale, mode=mode)
            for i in range(0, len(cond), bs)
        ]
        outs.append(torch.cat(parts))
    secs = time.perf_counter() - t0
    mean = F.normalize(torch.stack(outs).mean(0), dim=-1)
    return mean.numpy(), outs[0].numpy(), secs * 1000.0 / len(cond)


def bridge_runs(model: DiffGAP, ecfg: EvalConfig) -> dict[str, tuple[str, int, int]]:
    """The bridges of one split, key -> (bridge mode, K, samples): the retrieval bridge ("bridge":
    the config's mode and K, sampled as the runtime does) and the two diagnostic ones ("source", "noise")."""
    d = model.config.diffusion
    return {"bridge": (d.bridge_mode, ecfg.bridge_steps or d.sample_steps, RUNTIME_SAMPLES),
            "source": ("source", ecfg.source_steps, ecfg.source_samples),
            "noise": ("noise", ecfg.noise_steps, ecfg.noise_samples)}


def embed_split(model: DiffGAP, pairs: Pairs, ecfg: EvalConfig, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Raw, head-space and bridged embeddings of one split (the bridges of :func:`bridge_runs` named in
    ``keys``, default all; both directions)."""
    a, b = model.config.modalities
    bs = ecfg.batch_size
    emb: dict[str, Any] = {"raw": {m: pairs[m] for m in (a, b)},
                           "heads": {m: _project(model, m, pairs[m], bs) for m in (a, b)},
                           "bridged": {}, "single": {}, "ms_per_query": {}}
    for key, (mode, steps, samples) in bridge_runs(model, ecfg).items():
        if keys is not None and key not in keys:
            continue
        for direction in model.config.directions:
            _, source = parse_direction(direction)
            mean, single, sec_per_1k = bridge_array(model, direction, pairs[source], mode, steps, samples,
                                                    ecfg.seed, ecfg.guidance_scale, bs)
            emb["bridged"][(key, direction)] = mean
            emb["single"][(key, direction)] = single
            emb["ms_per_query"][(key, direction)] = sec_per_1k  # seconds per 1,000 queries
    return emb


def similarity_sets(emb: dict[str, Any], q: str, g: str) -> dict[str, np.ndarray]:
    """All (N_q, N_g) similarity matrices for queries of modality q against a gallery of g."""
    sims = {"raw": cosine(emb["raw"][q], emb["raw"][g]), "heads": cosine(emb["heads"][q], emb["heads"][g])}
    for key, suffix in (("bridge", ""), ("source", " src"), ("noise", " noise")):
        if (key, f"{g}_given_{q}") not in emb["bridged"]:
            continue
        # query-side: the query bridged into the gallery's modality, scored in the gallery's head space
        sims[f"q-bridge{suffix}"] = cosine(emb["bridged"][(key, f"{g}_given_{q}")], emb["heads"][g])
        # gallery-side: each gallery item bridged into the query's modality (index-time work)
        sims[f"g-bridge{suffix}"] = cosine(emb["heads"][q], emb["bridged"][(key, f"{q}_given_{g}")])
    return sims


# ---- the tables -----------------------------------------------------------------------------
ROWS: list[tuple[str, list[str]]] = [
    ("raw", ["raw"]),
    ("heads", ["heads"]),
    ("raw+heads", ["raw", "heads"]),
    ("q-bridge", ["q-bridge"]),
    ("g-bridge", ["g-bridge"]),
    ("q-bridge src", ["q-bridge src"]),
    ("q-bridge noise", ["q-bridge noise"]),
    ("g-bridge src", ["g-bridge src"]),
    ("g-bridge noise", ["g-bridge noise"]),
    ("q+g bridges", ["q-bridge", "g-bridge"]),
    ("full", ["raw", "heads", "q-bridge", "g-bridge"]),
]


CONTRASTS = [("full", "raw+heads"), ("full", "raw"), ("heads", "raw"), ("raw+heads", "raw")]
CONTROL_CONTRASTS = [("full", "linear adapter")]


@torch.no_grad()
def condition_usage(model: DiffGAP, pairs: Pairs, buckets: int = 10, seed: int = 0, bs: int = 1000) -> list[dict[str, Any]]:
    """Held-out x0 error (MSE per coordinate, standardised head space) with the true condition,
    a shuffled condition (rows permuted) and the null condition, per timestep bucket."""
    T = model.schedule.T
    a, b = model.config.modalities
    z = {m: model.standardize(m, torch.from_numpy(_project(model, m, pairs[m], bs))) for m in (a, b)}
    g = torch.Generator().manual_seed(seed)
    n = len(pairs)
    perm = torch.randperm(n, generator=g)
    if n > 1:  # a derangement-ish shuffle: no row keeps its own condition
        perm = torch.where(perm == torch.arange(n), (perm + 1) % n, perm)
    rows = []
    edges = np.linspace(0, T, buckets + 1).astype(int)
    for direction in model.config.directions:
        target, source = parse_direction(direction)
        x0, cond = z[target], z[source]
        for lo, hi in zip(edges[:-1], edges[1:]):
            t = torch.randint(int(lo), int(hi), (n,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            x_t = model.schedule.q_sample(x0, t, noise)
            err = {}
            for name, c, unc in (("true", cond, False), ("shuffled", cond[perm], False), ("null", cond, True)):
                _, x0_hat = model.predict_x0(direction, x_t, t, c, unconditional=unc)
                err[name] = float(((x0_hat - x0) ** 2).mean())
            rows.append({"direction": direction, "t_lo": int(lo), "t_hi": int(hi), **err,
                         "ratio": err["true"] / max(err["shuffled"], 1e-12)})
    return rows


def sample_sanity(emb: dict[str, Any], model: DiffGAP) -> list[dict[str, Any]]:
    """NaN/Inf, mean pairwise cosine and per-dimension mean of single bridged samples vs the real
    target modality's head embeddings."""
    out = []

    def mpc(x: np.ndarray) -> float:  # mean pairwise cosine of unit rows, O(N D)
        s = x.sum(0)
        n = len(x)
        return float((s @ s - (x * x).sum()) / (n * (n - 1)))

    for (mode, direction), x in emb["single"].items():
        target, _ = parse_direction(direction)
        real = emb["heads"][target]
        finite = bool(np.isfinite(x).all())
        xs = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        shift = float(np.sqrt(np.mean((xs.mean(0) - real.mean(0)) ** 2)))
        spread = float(np.sqrt(np.mean(real.std(0) ** 2)))
        d_mpc = mpc(xs) - mpc(real)
        out.append({
            "mode": mode, "direction": direction, "finite": finite,
            "mean_pairwise_cos": mpc(xs), "real_mean_pairwise_cos": mpc(real),
            "mean_shift_over_std": shift / max(spread, 1e-12),
            "ok": finite and abs(d_mpc) <= TOL_MEAN_PAIRWISE_COS and shift / max(spread, 1e-12) <= TOL_MEAN_SHIFT_OVER_STD,
        })
    return out


def _fallback_to_raw_heads(val_sims: dict[str, np.ndarray], comps: list[str], w: tuple[float, ...],
                           rh_weights: dict[str, float], ecfg: EvalConfig) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The ``full`` row keeps its bridge weights only if they beat ``raw+heads`` on validation with a
    paired-bootstrap 95% interval above zero; otherwise it falls back to the raw+heads weights (bridges
    at 0). Why: the grid search picks the best of ~300 weight vectors on 1,000 validation queries, and a
    gain within the validation noise need not carry to test."""
    val_full = ranks_of_diagonal(fuse([val_sims[c] for c in comps], w))
    rh = tuple(rh_weights.get(c, 0.0) for c in comps)
    val_rh = ranks_of_diagonal(fuse([val_sims[c] for c in comps], rh))
    lo, hi = bootstrap_ci(val_full, val_rh, n_boot=ecfg.n_boot, seed=ecfg.seed)
    keep = lo > 0
    info = {"applied": not keep, "val_gain_ci": [lo, hi],
            "val_gain_R@1": metrics_from_ranks(val_full)["R@1"] - metrics_from_ranks(val_rh)["R@1"]}
    return (w if keep else rh), info


def fusion_settings(model: DiffGAP, ecfg: EvalConfig) -> dict[str, Any]:
    """The bridge settings the ``full`` row's fusion weights are chosen for (an export must match them)."""
    mode, steps, samples = bridge_runs(model, ecfg)["bridge"]
    g = model.config.diffusion.guidance_scale if ecfg.guidance_scale is None else ecfg.guidance_scale
    return {"bridge_mode": mode, "steps": int(steps), "samples": samples, "guidance_scale": float(g)}


def evaluate(model: DiffGAP, test: Pairs, val: Pairs, ecfg: EvalConfig = EvalConfig(), train: Pairs | None = None,
             adapter_from_heads: bool = False, controls_cache: Any = None) -> dict[str, Any]:
    """The full evaluation as a JSON-able dict (see :func:`format_report`); with ``train`` also the
    control rows and the generative-prior table (:mod:`diffgap.eval_controls`). ``adapter_from_heads``:
    the linear-adapter control is the model's own linear heads; ``controls_cache``: a directory of controls
    ``diffgap train`` fitted (both: see :func:`diffgap.eval_controls.fit_controls`)."""
    model.eval()
    a, b = model.config.modalities
    for split, p in (("test", test), ("val", val)):
        for m in (a, b):
            p[m]  # raises a clear KeyError naming the file and modality
        have = {m: p.dims[m] for m in model.config.modalities}
        if have != model.config.input_dims:
            raise ValueError(f"{split} split {p.path} has widths {have}, the model takes {model.config.input_dims}")
    t_start = time.perf_counter()
    # The validation split only chooses fusion weights, and only the retrieval bridge is fused: the
    # diagnostic samplers (from the source, from noise) are single rows, bridged on the test split alone.
    emb = {"val": embed_split(model, val, ecfg, keys=("bridge",)), "test": embed_split(model, test, ecfg)}
    result: dict[str, Any] = {"eval_config": asdict(ecfg), "n_test": len(test), "n_val": len(val),
                              "bridge_mode": model.config.diffusion.bridge_mode,
                              "fusion_settings": fusion_settings(model, ecfg), "tasks": {}}
    ctl = cemb = None
    row_defs = list(ROWS)
    if train is not None:
        from . import eval_controls as ec

        ctl = ec.fit_controls(model, train, val, adapter_from_heads, cache=controls_cache)
        cemb = {s: ec.embed_controls(model, ctl, emb[s]) for s in ("val", "test")}
        row_defs = row_defs[:3] + ec.CONTROL_ROWS + row_defs[3:]
        result["controls"] = ctl["info"]
    # Retrieval tasks named by query->gallery, e.g. text->audio (T2A) and audio->text (A2T).
    for q, g in ((a, b), (b, a)):
        task = f"{q}->{g}"
        sims = {s: similarity_sets(emb[s], q, g) for s in ("val", "test")}
        if ctl is not None:
            for s in ("val", "test"):
                sims[s].update(ec.control_similarities(ctl, emb[s], cemb[s], q, g))
        rows, ranks = {}, {}
        for name, comps in row_defs:
            if len(comps) == 1:
                w = (1.0,)
                test_sim = sims["test"][comps[0]]
            else:
                w = choose_fusion_weights([sims["val"][c] for c in comps], ecfg.fusion_step).weights
                fallback = None
                if name == "full":
                    w, fallback = _fallback_to_raw_heads(sims["val"], comps, w, rows["raw+heads"]["weights"], ecfg)
                test_sim = fuse([sims["test"][c] for c in comps], w)
            r = ranks_of_diagonal(test_sim)
            ranks[name] = r
            m = metrics_from_ranks(r)
            m["R@1_ci"] = bootstrap_ci(r, n_boot=ecfg.n_boot, seed=ecfg.seed)
            m["weights"] = dict(zip(comps, w))
            if len(comps) > 1 and name == "full":
                m["fallback_to_raw+heads"] = fallback
            rows[name] = m
        contrasts = {}
        for x, y in CONTRASTS:
            d = rows[x]["R@1"] - rows[y]["R@1"]
            contrasts[f"{x} - {y}"] = {"delta_R@1": d, "ci": bootstrap_ci(ranks[x], ranks[y], n_boot=ecfg.n_boot, seed=ecfg.seed)}
        if ctl is not None:
            # the competitor with the highest *test* R@1: the conservative choice for the margin
            for label, pool in (("best baseline", ec.BASELINE_ROWS), ("best non-diffusion", ec.NON_DIFFUSION_ROWS)):
                y = max(pool, key=lambda r: rows[r]["R@1"])
                contrasts[f"full - {label} ({y})"] = {
                    "delta_R@1": rows["full"]["R@1"] - rows[y]["R@1"], "vs": y,
                    "ci": bootstrap_ci(ranks["full"], ranks[y], n_boot=ecfg.n_boot, seed=ecfg.seed)}
            for x, y in CONTROL_CONTRASTS:
                contrasts[f"{x} - {y}"] = {"delta_R@1": rows[x]["R@1"] - rows[y]["R@1"],
                                           "ci": bootstrap_ci(ranks[x], ranks[y], n_boot=ecfg.n_boot, seed=ecfg.seed)}
        result["tasks"][task] = {"rows": rows, "contrasts": contrasts}
    result["condition_usage"] = condition_usage(model, val, ecfg.usage_buckets, ecfg.seed, ecfg.batch_size)
    T = model.schedule.T
    result["condition_used_above_half_T"] = all(
        r["true"] < r["shuffled"] for r in result["condition_usage"] if r["t_lo"] >= T // 2)
    result["sanity"] = sample_sanity(emb["test"], model)
    if ctl is not None:
        result["prior"] = ec.prior_table(model, ctl, emb["test"], cemb["test"], emb["val"])
        from .generation_eval import raw_prior_table

        result["raw_prior"] = raw_prior_table(model, ctl, emb["test"], cemb["test"], emb["val"], seed=ecfg.seed)
    result["bridge_seconds_per_1000_queries"] = {f"{m} {d}": v for (m, d), v in emb["test"]["ms_per_query"].items()}
    result["eval_seconds"] = time.perf_counter() - t_start
    return result


# ---- printing ---------------------------------------------------------------------------------
def format_report(res: dict[str, Any]) -> str:
    lines = []
    for task, tr in res["tasks"].items():
        lines.append(f"\nRetrieval {task} on {res['n_test']} test pairs (fusion weights chosen on {res['n_val']} val pairs)")
        lines.append(f"{'system':<18}{'R@1':>7}{'95% CI':>15}{'R@5':>7}{'R@10':>7}{'mAP@10':>8}{'MedR':>6}  weights")
        for name, m in tr["rows"].items():
            lo, hi = m["R@1_ci"]
            w = " ".join(f"{k}={v:.1f}" for k, v in m["weights"].items()) if len(m["weights"]) > 1 else ""
            if name == "linear adapter" and "source" in res.get("controls", {}).get("linear adapter", {}):
                w = "= the heads (linear heads, trained as the adapter would be)"
            fb = m.get("fallback_to_raw+heads")
            if fb:
                lo_, hi_ = fb["val_gain_ci"]
                w += f"  ({'fell back to raw+heads' if fb['applied'] else 'kept'}: val gain {fb['val_gain_R@1']:+.1f} [{lo_:+.1f}, {hi_:+.1f}])"
            lines.append(f"{name:<18}{m['R@1']:7.1f}{f'[{lo:.1f},{hi:.1f}]':>15}{m['R@5']:7.1f}{m['R@10']:7.1f}"
                         f"{m['mAP@10']:8.1f}{m['MedR']:6.0f}  {w}")
        for name, c in tr["contrasts"].items():
            lo, hi = c["ci"]
            lines.append(f"  {name:<44} dR@1 {c['delta_R@1']:+5.1f}  paired 95% CI [{lo:+.1f}, {hi:+.1f}]")
    lines.append("\nCondition usage: held-out x0 MSE (standardised head space), true vs shuffled vs null condition")
    lines.append(f"{'direction':<20}{'t bucket':>12}{'true':>8}{'shuffled':>10}{'null':>8}{'true/shuf':>11}")
    for r in res["condition_usage"]:
        bucket = "[{},{})".format(r["t_lo"], r["t_hi"])
        lines.append(f"{r['direction']:<20}{bucket:>12}{r['true']:8.3f}{r['shuffled']:10.3f}"
                     f"{r['null']:8.3f}{r['ratio']:11.2f}")
    lines.append(f"condition used in every bucket above T/2: {res['condition_used_above_half_T']}")
    lines.append(f"\nSample sanity (single samples, test split; tolerances |d mean-pairwise-cos| <= {TOL_MEAN_PAIRWISE_COS}, "
                 f"mean shift <= {TOL_MEAN_SHIFT_OVER_STD} x per-dim std)")
    for s in res["sanity"]:
        lines.append(f"  {s['mode']:<7}{s['direction']:<20} finite={s['finite']} mpc={s['mean_pairwise_cos']:.3f} "
                     f"(real {s['real_mean_pairwise_cos']:.3f}) shift/std={s['mean_shift_over_std']:.2f} ok={s['ok']}")
    if "prior" in res:
        from .eval_controls import format_prior

        lines.append(format_prior(res["prior"]))
    if "raw_prior" in res:
        from .generation_eval import format_raw_prior

        lines.append(format_raw_prior(res["raw_prior"]))
    lines.append("\nBridge cost (seconds per 1,000 queries, this machine, all samples):")
    for k, v in res["bridge_seconds_per_1000_queries"].items():
        lines.append(f"  {k:<28}{v:8.2f}")
    return "\n".join(lines)
