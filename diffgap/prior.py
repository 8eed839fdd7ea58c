"""The bridge judged as a generative prior: does a bridged set land *on* the target distribution?

A bridge that feeds a generator must produce samples distributed like real target embeddings, not
their conditional mean (a regression to the mean scores well on cosine to the partner but has a
shrunken spread). Three figures, all in head space, per bridged set vs the real target set:

* mean cosine to the true partner (alignment of each sample with its own pair);
* Frechet distance between Gaussians fitted to the two sets (Heusel et al. 2017's FID formula,
  here on head-space embeddings): ``|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2})``;
* k-NN precision and recall (Kynkaanniemi et al. 2019, k = 3 as in the paper): precision = share of
  bridged samples inside the union of the real samples' k-NN balls (fidelity), recall = share of
  real samples inside the union of the bridged samples' k-NN balls (coverage).
"""
from __future__ import annotations

import numpy as np

KNN_K = 3  # Kynkaanniemi et al. 2019 use k = 3


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of x (N, D) and y (M, D).

    Tr((S_x S_y)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S_x^{1/2} S_y S_x^{1/2} (same spectrum as S_x S_y), which stays real and stable.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(sx)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sy @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2.0 * tr_sqrt)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest *other* row."""
    d = _sqdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Share of ``points`` inside at least one ball (centre, squared radius)."""
    inside = _sqdist(points, centres) <= radii[None, :]
    return float(inside.any(axis=1).mean())


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """(precision, recall) of the set ``fake`` against ``real`` (rows are samples), Kynkaanniemi et al. 2019."""
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"k-NN precision/recall needs more than k={k} samples per set, got {len(real)} and {len(fake)}")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def mean_cosine_to_partner(x: np.ndarray, partner: np.ndarray) -> float:
    """Mean over rows of cos(x_i, partner_i)."""
    x = np.asarray(x, np.float64)
    p = np.asarray(partner, np.float64)
    num = (x * p).sum(1)
    den = np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(p, axis=1), 1e-12)
    return float((num / den).mean())


def prior_figures(bridged: np.ndarray, real_target: np.ndarray, k: int = KNN_K) -> dict[str, float]:
    """All figures of one bridged set (N, D) against its real, row-paired target set (N, D)."""
    prec, rec = knn_precision_recall(real_target, bridged, k)
    return {"cos_to_partner": mean_cosine_to_partner(bridged, real_target),
            "frechet": frechet_distance(bridged, real_target), "precision": prec, "recall": rec}
