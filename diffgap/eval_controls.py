"""The control rows of ``diffgap eval`` (linear adapter, mean shift, regression bridge) and the
generative-prior table, computed from the training split and added to :func:`diffgap.evaluate.evaluate`.

Similarity names added per retrieval task q->g (see :func:`control_similarities`):

* ``linear adapter``  cosine of both modalities' linear-adapter embeddings;
* ``mean shift``      the raw query translated by mean(g) - mean(q) (train-split means), cosine to the raw gallery;
* ``q-reg``           the query's head embedding mapped by the g|q regression bridge, cosine to gallery heads;
* ``g-reg``           each gallery head embedding mapped by the q|g regression bridge, cosine to the query's heads.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from .baselines import apply_regression, mean_shift, train_linear_adapter, train_regression_bridges
from .core.data import Pairs
from .core.retrieval import cosine, l2n
from .models import DiffGAP, parse_direction
from .prior import frechet_distance, knn_precision_recall, prior_figures

log = logging.getLogger(__name__)

CONTROL_ROWS = [
    ("linear adapter", ["linear adapter"]),
    ("mean shift", ["mean shift"]),
    ("regression bridge", ["q-reg"]),
    ("raw+heads+reg", ["raw", "heads", "q-reg", "g-reg"]),
]
# rows that use no diffusion at all: the diffusion module's own share is full minus the best of these
NON_DIFFUSION_ROWS = ("raw", "heads", "raw+heads", "linear adapter", "mean shift", "regression bridge", "raw+heads+reg")
BASELINE_ROWS = ("linear adapter", "mean shift", "regression bridge")


@torch.no_grad()
def _heads(model: DiffGAP, m: str, x: np.ndarray, bs: int = 4096) -> np.ndarray:
    return torch.cat([model.project(m, torch.from_numpy(np.ascontiguousarray(x[i:i + bs]))) for i in range(0, len(x), bs)]).numpy()


def heads_are_linear_adapter(model: DiffGAP) -> bool:
    """True when the model's heads are the linear adapter itself: one linear map per modality, trained
    with the adapter's loss, recipe and early stopping (:func:`diffgap.train_val.train_heads`)."""
    h = model.config.heads
    return h.hidden == 0 and not h.identity


def fit_controls(model: DiffGAP, train: Pairs, val: Pairs, adapter_from_heads: bool = False) -> dict[str, Any]:
    """Train the linear adapter and the regression bridges; the train-split means for mean shift.

    ``adapter_from_heads``: the model's linear heads were trained on ``train`` (the checkpoint's own
    split) and :func:`heads_are_linear_adapter` holds, so the adapter row *is* the heads: a second
    training run of the same linear model would differ from them only by its batch order."""
    a, b = model.config.modalities
    t0 = time.perf_counter()
    tr = {m: np.asarray(train[m], np.float32) for m in (a, b)}
    va = {m: np.asarray(val[m], np.float32) for m in (a, b)}
    if adapter_from_heads:
        if not heads_are_linear_adapter(model):
            raise ValueError(f"adapter_from_heads needs linear heads; this model has heads.hidden = {model.config.heads.hidden}, "
                             f"identity = {model.config.heads.identity}")
        adapter, ad_info = model.heads, {"source": "the model's linear heads (the same linear map, loss and early stopping, "
                                                   "trained on this training split)"}
    else:
        adapter, ad_info = train_linear_adapter(model, tr, va)
    t1 = time.perf_counter()
    h_tr = {m: _heads(model, m, tr[m]) for m in (a, b)}
    h_va = {m: _heads(model, m, va[m]) for m in (a, b)}
    bridges, rb_info = train_regression_bridges(model, h_tr, h_va)
    ad_info["seconds"] = round(t1 - t0, 1)
    rb_info["seconds"] = round(time.perf_counter() - t1, 1)
    return {"adapter": adapter, "bridges": bridges,
            "raw_mean": {m: tr[m].mean(0) for m in (a, b)}, "head_mean": {m: h_tr[m].mean(0) for m in (a, b)},
            "info": {"linear adapter": ad_info, "regression bridge": rb_info}}


@torch.no_grad()
def embed_controls(model: DiffGAP, ctl: dict[str, Any], emb: dict[str, Any]) -> dict[str, Any]:
    """Control embeddings of one split, from its ``embed_split`` result ``emb``."""
    a, b = model.config.modalities
    out: dict[str, Any] = {"adapter": {m: ctl["adapter"](m, torch.from_numpy(np.ascontiguousarray(emb["raw"][m], dtype=np.float32))).numpy()
                                       for m in (a, b)}, "reg": {}}
    for d, net in ctl["bridges"].items():
        _, src = parse_direction(d)
        out["reg"][d] = apply_regression(model, net, d, emb["heads"][src])
    return out


def control_similarities(ctl: dict[str, Any], emb: dict[str, Any], cemb: dict[str, Any], q: str, g: str) -> dict[str, np.ndarray]:
    """The control similarity matrices (N_q, N_g) for queries of modality q against a gallery of g."""
    shifted = mean_shift(emb["raw"][q], ctl["raw_mean"][q], ctl["raw_mean"][g])
    return {"linear adapter": cosine(cemb["adapter"][q], cemb["adapter"][g]),
            "mean shift": cosine(shifted, emb["raw"][g]),
            "q-reg": cosine(cemb["reg"][f"{g}_given_{q}"], emb["heads"][g]),
            "g-reg": cosine(emb["heads"][q], cemb["reg"][f"{q}_given_{g}"])}


def prior_table(model: DiffGAP, ctl: dict[str, Any], emb_test: dict[str, Any], cemb_test: dict[str, Any],
                emb_val: dict[str, Any]) -> list[dict[str, Any]]:
    """Per direction: cosine to partner, Frechet distance, k-NN precision/recall of every bridged set
    (single samples for the diffusion bridges: a generator consumes one sample) vs the real test targets."""
    rows = []
    for d in model.config.directions:
        tgt, src = parse_direction(d)
        real = emb_test["heads"][tgt]
        h_src = emb_test["heads"][src]
        sets = {
            "retrieval bridge": emb_test["single"][("bridge", d)],
            "diffusion from source": emb_test["single"][("source", d)],
            "diffusion from noise": emb_test["single"][("noise", d)],
            "regression bridge": cemb_test["reg"][d],
            "mean shift": l2n(h_src - ctl["head_mean"][src] + ctl["head_mean"][tgt]),
            "raw source": h_src,
        }
        for name, x in sets.items():
            rows.append({"direction": d, "bridge": name, **prior_figures(x, real)})
        # reference: real targets of another split (unpaired): the floor a perfect sampler would reach
        other = emb_val["heads"][tgt]
        prec, rec = knn_precision_recall(real, other)
        rows.append({"direction": d, "bridge": "real (val split)", "cos_to_partner": None,
                     "frechet": frechet_distance(other, real), "precision": prec, "recall": rec})
    return rows


def format_prior(rows: list[dict[str, Any]]) -> str:
    lines = ["\nBridge as a generative prior (test split, head space; single samples; k-NN k=3; "
             "'real (val split)' = real targets of another split, the floor)",
             f"{'direction':<20}{'bridge':<24}{'cos->partner':>13}{'Frechet':>9}{'precision':>10}{'recall':>8}"]
    for r in rows:
        cos = "-" if r["cos_to_partner"] is None else f"{r['cos_to_partner']:.3f}"
        lines.append(f"{r['direction']:<20}{r['bridge']:<24}{cos:>13}{r['frechet']:9.3f}{r['precision']:10.3f}{r['recall']:8.3f}")
    return "\n".join(lines)
