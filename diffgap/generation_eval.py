"""The raw-space generative-prior table of ``diffgap eval``: which condition lands *on* the target
distribution, in the space a generator is conditioned in (raw CLAP / CAVP, unit norm)?

Rows, per direction, each a set of raw-space target embeddings for the test split's sources:

* ``raw source``        the source embedding itself (what a CLAP-conditioned generator is prompted with today);
* ``mean shift``        the source moved by mean(target) - mean(source) (training-split means), renormalised
  (Liang et al. 2022);
* ``posterior mean``    the retrieval bridge (K = 1 from noise: E[x0 | condition]) mapped back to raw space;
* ``regression bridge`` the deterministic control of ``diffgap eval``, mapped back to raw space;
* ``DiffGAP K-step``    N seeded K-step samples per source (:func:`diffgap.generation.sample_conditions`);
* ``real (val split)``  real targets of another split: the floor a perfect sampler would reach.

Figures against the real test targets (:mod:`diffgap.prior`): mean cosine to the true partner, Frechet
distance, k-NN precision / recall (sample 0 of each source, so every set has one row per source), and
the per-source diversity of the N samples: mean pairwise cosine distance ``1 - cos`` between a source's
samples (0 for a deterministic map). The goal a generator's condition should meet is checked per direction.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .core.errors import UserError
from .core.generation import GEN_GUIDANCE, GEN_STEPS
from .core.retrieval import l2n
from .generation import HeadInverse, check_invertible, sample_conditions
from .models import DiffGAP, parse_direction
from .prior import frechet_distance, knn_precision_recall, prior_figures

log = logging.getLogger(__name__)

RAW_PRIOR_SAMPLES = 4        # N samples per source for the diversity column
# The goal (per direction): DiffGAP's Frechet distance <= FRECHET_RATIO x the raw source's and below the
# posterior mean's and the regression bridge's; recall >= RECALL_SHARE x the real-vs-real floor; cosine
# to the partner not below the raw source's.
FRECHET_RATIO = 0.25
RECALL_SHARE = 0.85
DIFFGAP_ROW = "DiffGAP K-step"


def diversity(samples: np.ndarray) -> float:
    """Mean over sources of the mean pairwise cosine distance between its N samples; samples: (B, N, E)."""
    B, N, _ = samples.shape
    if N < 2:
        return 0.0
    x = samples / np.linalg.norm(samples, axis=-1, keepdims=True)
    g = np.einsum("bne,bme->bnm", x, x)
    off = (g.sum(axis=(1, 2)) - np.trace(g, axis1=1, axis2=2)) / (N * (N - 1))
    return float((1.0 - off).mean())


@torch.no_grad()
def _to_raw(inv: HeadInverse, h: np.ndarray) -> np.ndarray:
    return inv(torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32))).numpy()


def raw_prior_table(model: DiffGAP, ctl: dict[str, Any], emb_test: dict[str, Any], cemb_test: dict[str, Any],
                    emb_val: dict[str, Any], n: int = RAW_PRIOR_SAMPLES, steps: int = GEN_STEPS,
                    guidance_scale: float = GEN_GUIDANCE, seed: int = 0,
                    directions: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The table as ``{"rows": [...], "goal": {direction: {...}}, "settings": {...}}`` (or ``{"skipped": why}``)."""
    try:
        check_invertible(model)
    except UserError as e:
        return {"skipped": str(e)}
    rows: list[dict[str, Any]] = []
    goal: dict[str, Any] = {}
    for d in directions or model.config.directions:
        tgt, src = parse_direction(d)
        inv = HeadInverse(model, tgt)
        real = emb_test["raw"][tgt]
        source = emb_test["raw"][src]
        # one seed per source (seed * B + b): sources sharing a seed would share their noise
        samples = sample_conditions(model, source, n, seed * len(source), steps, guidance_scale, direction=d)  # (B, N, E)
        sets = {
            "raw source": source,
            "mean shift": l2n(source - ctl["raw_mean"][src] + ctl["raw_mean"][tgt]),
            "posterior mean": _to_raw(inv, emb_test["single"][("bridge", d)]),
            "regression bridge": _to_raw(inv, cemb_test["reg"][d]),
            DIFFGAP_ROW: samples[:, 0],
        }
        by_name = {}
        for name, x in sets.items():
            r = {"direction": d, "row": name, **prior_figures(x, real),
                 "diversity": diversity(samples) if name == DIFFGAP_ROW else 0.0}
            rows.append(r)
            by_name[name] = r
        other = emb_val["raw"][tgt]
        prec, rec = knn_precision_recall(real, other)
        floor = {"direction": d, "row": "real (val split)", "cos_to_partner": None,
                 "frechet": frechet_distance(other, real), "precision": prec, "recall": rec, "diversity": None}
        rows.append(floor)
        g = by_name[DIFFGAP_ROW]
        checks = {
            f"frechet <= {FRECHET_RATIO} x raw source": g["frechet"] <= FRECHET_RATIO * by_name["raw source"]["frechet"],
            "frechet < posterior mean": g["frechet"] < by_name["posterior mean"]["frechet"],
            "frechet < regression bridge": g["frechet"] < by_name["regression bridge"]["frechet"],
            f"recall >= {RECALL_SHARE} x floor": g["recall"] >= RECALL_SHARE * rec,
            "cos to partner >= raw source": g["cos_to_partner"] >= by_name["raw source"]["cos_to_partner"],
        }
        # the exactness of the map back, on real targets: head image -> raw space -> compare
        with torch.no_grad():
            back = _to_raw(inv, model.project(tgt, torch.from_numpy(np.ascontiguousarray(real))).numpy())
        goal[d] = {"checks": checks, "met": all(checks.values()),
                   "inverse_round_trip_max_abs": float(np.abs(back - real).max()),
                   "frechet_over_raw": g["frechet"] / max(by_name["raw source"]["frechet"], 1e-12),
                   "recall_over_floor": g["recall"] / max(rec, 1e-12)}
    return {"rows": rows, "goal": goal, "settings": {"n": n, "steps": steps, "guidance_scale": guidance_scale, "seed": seed}}


def format_raw_prior(table: dict[str, Any]) -> str:
    if "skipped" in table:
        return f"\nRaw-space generative prior: skipped ({table['skipped']})"
    s = table["settings"]
    lines = [f"\nGenerative prior in raw embedding space (the generator's condition; test split; K = {s['steps']}, "
             f"guidance {s['guidance_scale']}, N = {s['n']} samples per source for diversity, sample 0 elsewhere; k-NN k=3; "
             "'real (val split)' = the floor)",
             f"{'direction':<20}{'condition':<20}{'cos->partner':>13}{'Frechet':>9}{'precision':>10}{'recall':>8}{'diversity':>10}"]
    for r in table["rows"]:
        cos = "-" if r["cos_to_partner"] is None else f"{r['cos_to_partner']:.3f}"
        div = "-" if r["diversity"] is None else f"{r['diversity']:.3f}"
        lines.append(f"{r['direction']:<20}{r['row']:<20}{cos:>13}{r['frechet']:9.3f}{r['precision']:10.3f}{r['recall']:8.3f}{div:>10}")
    for d, g in table["goal"].items():
        missed = [k for k, ok in g["checks"].items() if not ok]
        lines.append(f"  goal {d}: {'met' if g['met'] else 'NOT met (' + '; '.join(missed) + ')'}; "
                     f"Frechet / raw source {g['frechet_over_raw']:.2f}, recall / floor {g['recall_over_floor']:.2f}; "
                     f"map back through the head, round trip on real targets: max abs {g['inverse_round_trip_max_abs']:.1e}")
    return "\n".join(lines)

