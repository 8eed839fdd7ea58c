"""The non-diffusion controls ``diffgap eval`` reports beside DiffGAP.

* :func:`train_linear_adapter` -- one linear map per modality (frozen embedding -> D), symmetric
  InfoNCE with a learnable temperature: the strongest *linear* use of the same training pairs.
  Trained and validation-selected exactly like the heads (:func:`diffgap.train_val.run_stage`: same
  optimiser, LR, batch, EMA, early stopping and criterion -- mean validation R@1 of both directions).
* :func:`mean_shift` -- training-free: translate each query by the difference of the two
  modalities' means (Liang et al. 2022, "Mind the Gap"); means from the training split.
* :class:`RegressionBridge` -- a deterministic residual MLP with (about) the denoiser's parameter
  count, mapping the source's standardised head-space embedding to the target's, trained with the
  denoiser's losses minus the diffusion (MSE in standardised head space + ``train.lambda_x0`` x
  one-way InfoNCE against the batch's true targets), validation-selected on the mean of both
  directions' R@1. It answers whether the *diffusion* in the bridge matters, or only a learned map.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.retrieval import l2n
from .models import ConditionMean, DiffGAP, count_parameters, parse_direction

log = logging.getLogger(__name__)


# ---- mean shift ----------------------------------------------------------------------------------
def mean_shift(queries: np.ndarray, mean_query_modality: np.ndarray, mean_gallery_modality: np.ndarray) -> np.ndarray:
    """Queries (N, E) translated by ``mean_gallery - mean_query`` (Liang et al. 2022); not normalised."""
    return np.asarray(queries, np.float32) + (np.asarray(mean_gallery_modality, np.float32) - np.asarray(mean_query_modality, np.float32))


# ---- linear adapter ------------------------------------------------------------------------------
class LinearAdapter(nn.Module):
    """One linear map per modality into a D-d space (identity-initialised when E == D), plus CLIP's temperature."""

    def __init__(self, input_dims: dict[str, int], dim: int, init_temperature: float = 0.07):  # input_dims: {modality: E}
        super().__init__()
        self.maps = nn.ModuleDict({m: nn.Linear(e, dim) for m, e in input_dims.items()})
        for lin in self.maps.values():
            if lin.in_features == dim:
                nn.init.eye_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / init_temperature))))

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.maps[modality](x), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


def _r1_mean(q: dict[str, np.ndarray], g: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> float:
    from .train_val import _r1

    return float(np.mean([_r1(q[a], g[b]) for a, b in pairs]))


def train_linear_adapter(model: DiffGAP, train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> tuple[LinearAdapter, dict[str, Any]]:
    """Fit the linear adapter with the heads' training recipe (``model.config.train``) on ``train[m]: (N, E)``."""
    from .train import info_nce
    from .train_val import run_stage

    cfg = model.config
    tcfg = cfg.train
    a, b = cfg.modalities
    torch.manual_seed(tcfg.seed)
    ad = LinearAdapter(cfg.input_dims, cfg.heads.dim, cfg.heads.init_temperature)
    ema = copy.deepcopy(ad)
    X = {m: torch.from_numpy(np.ascontiguousarray(train[m])) for m in (a, b)}
    nv = min(len(val[a]), tcfg.val_max_pairs)
    V = {m: torch.from_numpy(np.ascontiguousarray(val[m][:nv])) for m in (a, b)}
    gen = torch.Generator().manual_seed(tcfg.seed * 1000003 + 1)

    def loss(step: int) -> torch.Tensor:
        i = torch.randint(0, len(X[a]), (tcfg.batch_size,), generator=gen)
        return info_nce(ad(a, X[a][i]), ad(b, X[b][i]), ad.scale())

    @torch.no_grad()
    def val_fn(m: LinearAdapter) -> dict[str, Any]:
        h = {k: m(k, V[k]).numpy() for k in (a, b)}
        return {"r1": _r1_mean(h, h, [(a, b), (b, a)])}

    st = run_stage("heads", ad, ema, list(ad.parameters()), tcfg, loss, val_fn, "r1", tcfg.max_head_steps)
    return ema.eval(), {"steps_run": st.steps, "best_step": st.best_step, "val_r1": st.best["r1"],
                        "parameters": count_parameters(ad)}


# ---- regression bridge ---------------------------------------------------------------------------
class RegressionBridge(ConditionMean):
    """Standardised source head embedding (B, D) -> standardised target estimate (B, D): the
    architecture of the denoiser's conditional-mean branch (:class:`diffgap.models.ConditionMean`)
    alone, its width chosen so the parameter count matches ``target_params`` (the whole denoiser's)."""

    @classmethod
    def matching(cls, dim: int, depth: int, mlp_ratio: float, target_params: int) -> "RegressionBridge":
        """The width (a multiple of 8) whose parameter count is closest to ``target_params``."""
        def count(h: int) -> int:
            inner = max(1, int(h * mlp_ratio))
            return (dim * h + h) + depth * (2 * h + h * inner + inner + inner * h + h) + 2 * h + h * dim + dim

        best = min(range(8, 8 * 1024, 8), key=lambda h: abs(count(h) - target_params))
        return cls(dim, best, depth, mlp_ratio)


def train_regression_bridges(model: DiffGAP, h_train: dict[str, np.ndarray], h_val: dict[str, np.ndarray]) -> tuple[dict[str, RegressionBridge], dict[str, Any]]:
    """One :class:`RegressionBridge` per direction on the model's (frozen) head-space embeddings
    ``h_*[m]: (N, D)``, trained together and early-stopped on their mean validation R@1."""
    from .train_val import run_stage

    cfg = model.config
    tcfg = cfg.train
    a, b = cfg.modalities
    torch.manual_seed(tcfg.seed)
    target_params = count_parameters(model.denoiser(cfg.directions[0]))
    bridges = nn.ModuleDict({d: RegressionBridge.matching(cfg.heads.dim, cfg.denoiser.depth, cfg.denoiser.mlp_ratio, target_params)
                             for d in cfg.directions})
    ema = copy.deepcopy(bridges)
    H = {m: torch.from_numpy(np.ascontiguousarray(h_train[m])) for m in (a, b)}
    nv = min(len(h_val[a]), tcfg.val_max_pairs)
    HV = {m: torch.from_numpy(np.ascontiguousarray(h_val[m][:nv])) for m in (a, b)}
    scale = model.heads.scale().detach()
    gen = torch.Generator().manual_seed(tcfg.seed * 1000003 + 2)
    nd = min(tcfg.denoiser_batch_size, tcfg.batch_size)

    def loss(step: int) -> torch.Tensor:
        i = torch.randint(0, len(H[a]), (tcfg.batch_size,), generator=gen)
        total = torch.zeros(())
        for d, net in bridges.items():
            tgt, src = parse_direction(d)
            with torch.no_grad():
                zs, zt = model.standardize(src, H[src][i[:nd]]), model.standardize(tgt, H[tgt][i[:nd]])
            pred = net(zs)
            h0 = F.normalize(model.unstandardize(tgt, pred), dim=-1)
            nce = F.cross_entropy(scale * h0 @ H[tgt][i].T, torch.arange(nd))
            total = total + F.mse_loss(pred, zt) + tcfg.lambda_x0 * nce
        return total

    @torch.no_grad()
    def val_fn(nets: nn.ModuleDict) -> dict[str, Any]:
        from .train_val import _r1

        r = {d: _r1(apply_regression(model, nets[d], d, HV[parse_direction(d)[1]].numpy()), HV[parse_direction(d)[0]].numpy())
             for d in cfg.directions}
        return {"r1": float(np.mean(list(r.values()))), "per_direction": r}

    st = run_stage("denoisers", bridges, ema, list(bridges.parameters()), tcfg, loss, val_fn, "r1", tcfg.max_denoiser_steps)
    ema.eval()
    return dict(ema.items()), {"steps_run": st.steps, "best_step": st.best_step, "val_r1": st.best["r1"],
                               "parameters_per_direction": count_parameters(ema[cfg.directions[0]]),
                               "denoiser_parameters_per_direction": target_params}


@torch.no_grad()
def apply_regression(model: DiffGAP, net: RegressionBridge, direction: str, h_source: np.ndarray) -> np.ndarray:
    """Head-space source embeddings (N, D) -> bridged, L2-normalised target head-space embeddings (N, D)."""
    tgt, src = parse_direction(direction)
    z = model.standardize(src, torch.from_numpy(np.ascontiguousarray(h_source, dtype=np.float32)))
    return l2n(model.unstandardize(tgt, net(z)).numpy())
