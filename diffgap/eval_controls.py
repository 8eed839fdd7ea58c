"""The control rows of ``diffgap eval`` (linear adapter, mean shift, regression bridge) and the
generative-prior table, computed from the training split and added to :func:`diffgap.evaluate.evaluate`.

Similarity names added per retrieval task q->g (see :func:`control_similarities`):

* ``linear adapter``  cosine of both modalities' linear-adapter embeddings;
* ``mean shift``      the raw query translated by mean(g) - mean(q) (train-split means), cosine to the raw gallery;
* ``q-reg``           the query's head embedding mapped by the g|q regression bridge, cosine to gallery heads;
* ``g-reg``           each gallery head embedding mapped by the q|g regression bridge, cosine to the query's heads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baselines import LinearAdapter, RegressionBridge, apply_regression, mean_shift, train_linear_adapter, train_regression_bridges
from .core.data import Pairs, load_pairs
from .core.fsutil import atomic_write_json, sha256_file
from .core.retrieval import cosine, l2n
from .models import DiffGAP, count_parameters, parse_direction
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


def fit_controls(model: DiffGAP, train: Pairs, val: Pairs, adapter_from_heads: bool = False,
                 cache: str | Path | None = None) -> dict[str, Any]:
    """Train the linear adapter and the regression bridges; the train-split means for mean shift.

    ``adapter_from_heads``: the model's linear heads were trained on ``train`` (the checkpoint's own
    split) and :func:`heads_are_linear_adapter` holds, so the adapter row *is* the heads: a second
    training run of the same linear model would differ from them only by its batch order.
    ``cache``: a directory written by :func:`save_controls` (``diffgap train`` fits the controls beside
    the denoiser stage, :class:`BackgroundControls`); used when its key matches this model, these
    splits and ``adapter_from_heads`` (:func:`controls_key`), else the controls are trained here."""
    a, b = model.config.modalities
    tr, va, h_tr = _split_arrays(model, train, val)
    nets = None
    if cache is not None:
        nets = load_controls(cache, model, controls_key(model, train, val, adapter_from_heads), adapter_from_heads)
    if nets is None:
        nets = _fit_nets(model, tr, va, h_tr, adapter_from_heads)
    adapter, bridges, info = nets
    return {"adapter": adapter, "bridges": bridges,
            "raw_mean": {m: tr[m].mean(0) for m in (a, b)}, "head_mean": {m: h_tr[m].mean(0) for m in (a, b)},
            "info": info}


def _split_arrays(model: DiffGAP, train: Pairs, val: Pairs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both splits as float32 arrays per modality, and the training split in head space."""
    a, b = model.config.modalities
    tr = {m: np.asarray(train[m], np.float32) for m in (a, b)}
    va = {m: np.asarray(val[m], np.float32) for m in (a, b)}
    return tr, va, {m: _heads(model, m, tr[m]) for m in (a, b)}


def _fit_nets(model: DiffGAP, tr: dict[str, np.ndarray], va: dict[str, np.ndarray], h_tr: dict[str, np.ndarray],
              adapter_from_heads: bool) -> tuple[Any, dict[str, RegressionBridge], dict[str, Any]]:
    a, b = model.config.modalities
    t0 = time.perf_counter()
    if adapter_from_heads:
        if not heads_are_linear_adapter(model):
            raise ValueError(f"adapter_from_heads needs linear heads; this model has heads.hidden = {model.config.heads.hidden}, "
                             f"identity = {model.config.heads.identity}")
        adapter, ad_info = model.heads, {"source": "the model's linear heads (the same linear map, loss and early stopping, "
                                                   "trained on this training split)"}
    else:
        adapter, ad_info = train_linear_adapter(model, tr, va)
    t1 = time.perf_counter()
    h_va = {m: _heads(model, m, va[m]) for m in (a, b)}
    bridges, rb_info = train_regression_bridges(model, h_tr, h_va)
    ad_info["seconds"] = round(t1 - t0, 1)
    rb_info["seconds"] = round(time.perf_counter() - t1, 1)
    return adapter, bridges, {"linear adapter": ad_info, "regression bridge": rb_info}


# ---- a cache of the trained controls ---------------------------------------------------------------
CONTROLS_DIR = "controls"            # in the checkpoint directory
CONTROLS_FORMAT = "diffgap-controls/1"
CONTROLS_WEIGHTS = "controls.safetensors"
CONTROLS_JSON = "controls.json"


def controls_key(model: DiffGAP, train: Pairs, val: Pairs, adapter_from_heads: bool) -> str:
    """sha256 of everything the trained controls depend on: the config, the heads and head-space
    statistics (the regression bridges are trained in that space), both split files, the adapter rule."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": model.config.to_dict(), "adapter_from_heads": bool(adapter_from_heads)}, sort_keys=True).encode())
    state = {f"heads.{k}": v for k, v in model.heads.state_dict().items()}
    state.update({k: v for k, v in model.named_buffers() if k.startswith("stats_")})
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    for p in (train, val):
        h.update(sha256_file(p.path).encode())
    return h.hexdigest()


def save_controls(directory: str | Path, adapter: Any, bridges: dict[str, RegressionBridge], info: dict[str, Any], key: str) -> None:
    """Write the trained controls to ``directory`` (weights as safetensors, the key and the training record as JSON)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"reg.{direction}.{k}": v.detach().contiguous() for direction, net in bridges.items() for k, v in net.state_dict().items()}
    if isinstance(adapter, LinearAdapter):
        tensors.update({f"adapter.{k}": v.detach().contiguous() for k, v in adapter.state_dict().items()})
    save_file(tensors, str(d / CONTROLS_WEIGHTS), metadata={"format": CONTROLS_FORMAT})
    atomic_write_json(d / CONTROLS_JSON, {"format": CONTROLS_FORMAT, "key": key, "info": info,
                                          "sha256": sha256_file(d / CONTROLS_WEIGHTS)})


def load_controls(directory: str | Path, model: DiffGAP, key: str,
                  adapter_from_heads: bool) -> tuple[Any, dict[str, RegressionBridge], dict[str, Any]] | None:
    """The controls saved in ``directory`` if its key is ``key`` (None when absent, stale or unreadable)."""
    from safetensors.torch import load_file

    d = Path(directory)
    try:
        doc = json.loads((d / CONTROLS_JSON).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("format") != CONTROLS_FORMAT or doc.get("key") != key:
        log.info("controls in %s were trained for another model or split; training them again", d)
        return None
    if sha256_file(d / CONTROLS_WEIGHTS) != doc.get("sha256"):
        log.warning("%s does not match its sha256 in %s; training the controls again", d / CONTROLS_WEIGHTS, CONTROLS_JSON)
        return None
    tensors = load_file(str(d / CONTROLS_WEIGHTS))
    cfg = model.config
    target = count_parameters(model.denoiser(cfg.directions[0]))
    bridges = {}
    for direction in cfg.directions:
        net = RegressionBridge.matching(cfg.heads.dim, cfg.denoiser.depth, cfg.denoiser.mlp_ratio, target)
        net.load_state_dict({k[len(f"reg.{direction}."):]: v for k, v in tensors.items() if k.startswith(f"reg.{direction}.")})
        bridges[direction] = net.eval()
    if adapter_from_heads:
        adapter = model.heads
    else:
        adapter = LinearAdapter(cfg.input_dims, cfg.heads.dim, cfg.heads.init_temperature)
        adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
        adapter.eval()
    info = {name: {**rec, "cache": f"trained beside the denoiser stage by `diffgap train` ({d.name}/)"}
            for name, rec in doc["info"].items()}
    log.info("controls loaded from %s", d)
    return adapter, bridges, info


def _fit_and_save(state: dict[str, torch.Tensor], config: dict[str, Any], train_path: str, val_path: str,
                  adapter_from_heads: bool, out: str, threads: int) -> None:
    """Child process of :class:`BackgroundControls`: rebuild the model, fit the controls, save them."""
    from .config import DiffGAPConfig

    torch.set_num_threads(threads)
    model = DiffGAP(DiffGAPConfig.from_dict(config))
    model.load_state_dict(state)
    model.eval()
    a, b = model.config.modalities
    train = load_pairs(train_path, embed_dim=model.config.input_dims, require=(a, b))
    val = load_pairs(val_path, embed_dim=model.config.input_dims, require=(a, b))
    adapter, bridges, info = _fit_nets(model, *_split_arrays(model, train, val), adapter_from_heads)
    save_controls(out, adapter, bridges, info, controls_key(model, train, val, adapter_from_heads))


class BackgroundControls:
    """Fit the eval controls in a child process on one core while the parent trains the denoisers.

    Started once the heads are frozen (the regression bridges are trained in their space). The parent
    gives up one of its torch threads while the child runs and takes it back when the child is done
    (:meth:`poll`). Two processes on one thread each do more small-matrix work per second than one
    process on two threads, and the controls end before the denoiser stage does, so they cost the
    training little and ``diffgap eval`` none. :meth:`finish` waits for the child and moves its files
    into the checkpoint (``<checkpoint>/controls``)."""

    def __init__(self, model: DiffGAP, train_path: str, val_path: str, adapter_from_heads: bool, scratch_parent: str | Path):
        self.threads = torch.get_num_threads()
        Path(scratch_parent).mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".controls.", dir=str(scratch_parent)))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_fit_and_save, daemon=True,
                                args=(state, model.config.to_dict(), str(train_path), str(val_path), adapter_from_heads, str(self.tmp), 1))
        self.t0 = time.perf_counter()
        self.proc.start()
        torch.set_num_threads(max(1, self.threads - 1))
        self.seconds: float | None = None

    def poll(self) -> None:
        """Give the parent its threads back once the child has ended."""
        if self.seconds is None and not self.proc.is_alive():
            self.seconds = time.perf_counter() - self.t0
            torch.set_num_threads(self.threads)

    def finish(self, checkpoint: str | Path) -> Path | None:
        """Wait for the child; move its controls into ``checkpoint``/controls. None if it failed."""
        self.proc.join()
        self.poll()
        try:
            if self.proc.exitcode != 0 or not (self.tmp / CONTROLS_JSON).exists():
                log.warning("fitting the eval controls beside training failed (exit code %s); `diffgap eval` trains them itself",
                            self.proc.exitcode)
                return None
            dest = Path(checkpoint) / CONTROLS_DIR
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(self.tmp, dest)
            return dest
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def cancel(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        shutil.rmtree(self.tmp, ignore_errors=True)
        torch.set_num_threads(self.threads)



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
