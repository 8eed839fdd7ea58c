"""Checkpoints: a directory with safetensors weights and a JSON config -- no pickle.

Layout (``format: diffgap-checkpoint/1``)::

    <ckpt>/
      config.json              {"format", "package_version", "config": DiffGAPConfig.to_dict(),
                                "meta": {step, metrics, ...}, "files": {name: sha256}, "train_state": {...}}
      model.safetensors        the weights to use (EMA weights after training), buffers included
      train_state.safetensors  optional, for resuming: live weights ("live.*"), optimiser
                               tensors ("optim.<param index>.<name>") and extras ("extra.*", RNG state)

The whole directory is built under a temporary sibling and renamed into place (``atomic_dir``),
so an interrupted save never leaves a half-written checkpoint. ``load_checkpoint`` verifies the
sha256 of every file it reads, so truncation/corruption gives a clear error instead of garbage.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import DiffGAPConfig
from .core.errors import UserError
from .core.fsutil import atomic_dir, read_versioned_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = "diffgap-checkpoint/1"
CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.safetensors"


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimiser state_dict -> (tensors, json-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (a :class:`~diffgap.models.DiffGAP`) and its config to the directory ``path``.

    ``train_state`` (optional, for resuming) = ``{"live_model": state_dict, "optimizer":
    optimizer.state_dict(), "json": {...json-able extras, e.g. step...}, "tensors": {name: tensor}}``
    (``tensors``: e.g. RNG states, stored as ``extra.<name>``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    cfg: DiffGAPConfig = model.config
    doc: dict[str, Any] = {
        "format": FORMAT,
        "package_version": __version__,
        "config": cfg.to_dict(),
        "meta": dict(meta or {}),
        "files": {},
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(_contiguous(model.state_dict()), str(tmp / WEIGHTS), metadata={"format": FORMAT, "preset": cfg.name})
        files = [WEIGHTS]
        if train_state is not None:
            tensors = {f"live.{k}": v for k, v in _contiguous(train_state["live_model"]).items()}
            tensors.update({f"extra.{k}": v for k, v in _contiguous(train_state.get("tensors", {})).items()})
            info: dict[str, Any] = {"json": train_state.get("json", {})}
            if train_state.get("optimizer") is not None:
                opt_tensors, opt_info = _flatten_optimizer(train_state["optimizer"])
                tensors.update(_contiguous(opt_tensors))
                info["optimizer"] = opt_info
            save_file(tensors, str(tmp / TRAIN_STATE), metadata={"format": FORMAT})
            doc["train_state"] = info
            files.append(TRAIN_STATE)
        doc["files"] = {f: sha256_file(tmp / f) for f in files}
        (tmp / CONFIG_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    log.info("saved checkpoint %s (preset %s)", path, cfg.name)
    return path


def _read_doc(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `diffgap train --out {path}`")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory; pass the directory written by `diffgap train`")
    cj = path / CONFIG_JSON
    if not cj.exists():
        raise FileNotFoundError(f"{cj} is missing; {path} is not a diffgap checkpoint (retrain or pass the right directory)")
    return read_versioned_json(cj, FORMAT, "checkpoint config", "the checkpoint is corrupt or not diffgap's: retrain with `diffgap train`")


def _read_tensors(path: Path, name: str, doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = path / name
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing; the checkpoint is incomplete, retrain or copy it again")
    want = doc.get("files", {}).get(name)
    if want is not None and sha256_file(f) != want:
        raise UserError(f"{f} is corrupt (sha256 mismatch with config.json); retrain or copy the checkpoint again")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise UserError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e}); the checkpoint is corrupt") from None


def read_config(path: str | Path) -> DiffGAPConfig:
    """The config a checkpoint was trained with (no weights read)."""
    return DiffGAPConfig.from_dict(_read_doc(Path(path))["config"])


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", expect_preset: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint directory -> (DiffGAP in eval mode, meta dict incl. ``config`` and ``step``).

    ``expect_preset``: raise ``ValueError`` if the checkpoint was trained with another preset.
    """
    from .models import DiffGAP

    path = Path(path)
    doc = _read_doc(path)
    cfg = DiffGAPConfig.from_dict(doc["config"])
    if expect_preset is not None and cfg.name != expect_preset:
        raise UserError(f"checkpoint {path} is preset {cfg.name!r}, expected {expect_preset!r}; pass the matching checkpoint or preset")
    sd = _read_tensors(path, WEIGHTS, doc)
    model = DiffGAP(cfg)
    _load_state(model, sd, path / WEIGHTS)
    model.to(map_location).eval()
    meta = dict(doc.get("meta", {}))
    meta["config"] = cfg.to_dict()
    meta["preset"] = cfg.name
    meta["package_version"] = doc.get("package_version")
    return model, meta


def _load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{where} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the weights were written for another preset"
        )
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise UserError(f"{where}: tensor {k} has shape {tuple(v.shape)}, config expects {tuple(own[k].shape)}; wrong preset")
    model.load_state_dict(sd)


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """Resumable state of a checkpoint, or None if it has none.

    Returns ``{"live_model": state_dict, "optimizer": optimizer state_dict or None, "json": {...},
    "tensors": {name: tensor}}``.
    """
    path = Path(path)
    doc = _read_doc(path)
    info = doc.get("train_state")
    if info is None:
        return None
    tensors = _read_tensors(path, TRAIN_STATE, doc)
    live = {k[len("live."):]: v for k, v in tensors.items() if k.startswith("live.")}
    opt = _unflatten_optimizer(tensors, info["optimizer"]) if "optimizer" in info else None
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return {"live_model": live, "optimizer": opt, "json": info.get("json", {}), "tensors": extra}
