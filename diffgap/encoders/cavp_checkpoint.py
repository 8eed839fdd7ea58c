"""Loading Diff-Foley CAVP checkpoints into :class:`~diffgap.encoders.cavp_networks.CavpModel`.

As Diff-Foley's ``inference/demo_util.py``: ``torch.load``, unwrap ``"state_dict"``, strip DDP's
``"module."`` prefix; then the exact key set and shapes are required (strict), refusing with the
first mismatch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from diffgap.core.errors import UserError

from .cavp_networks import CavpModel

log = logging.getLogger(__name__)


# ---- checkpoint loading -----------------------------------------------------------------------
def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"cannot read CAVP checkpoint {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass Diff-Foley's CAVP .ckpt/.pt (read with torch.load(weights_only=True): re-save just its "
            "state dict if it pickles other objects) or a .safetensors file"
        ) from None


def load_cavp_state_dict(model: CavpModel, path: str | Path) -> None:
    """Load a Diff-Foley CAVP checkpoint into ``model`` strictly; refuse with the first mismatch.

    Accepts the raw state dict or a dict holding it under ``"state_dict"`` (or ``"model"``), with or
    without DDP's ``"module."`` prefix (as Diff-Foley's ``init_first_from_ckpt`` does).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CAVP checkpoint {str(path)!r} not found; pass the path to Diff-Foley's CAVP checkpoint file")
    raw = _read_checkpoint(path)
    if not isinstance(raw, Mapping):
        raise UserError(f"CAVP checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if wrapper in raw and isinstance(raw[wrapper], Mapping):
            raw = raw[wrapper]
            break
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in raw.items()}
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in sd:
            raise UserError(
                f"CAVP checkpoint {str(path)!r} lacks key {key!r} (first mismatch against the Diff-Foley CAVP "
                f"layout for config {model.config.name!r}); is it a Stage-1 CAVP checkpoint of this architecture?"
            )
        got = sd[key]
        if not isinstance(got, torch.Tensor):
            raise UserError(f"CAVP checkpoint {str(path)!r}: {key!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(ref.shape):
            raise UserError(
                f"CAVP checkpoint {str(path)!r}: {key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)} "
                f"for config {model.config.name!r} (first mismatch); build the encoder with the CavpConfig the checkpoint was trained with"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise UserError(
            f"CAVP checkpoint {str(path)!r} has unexpected key {extra[0]!r} ({len(extra)} in all; first mismatch); "
            "it is not a Diff-Foley Stage-1 CAVP checkpoint of this architecture"
        )
    model.load_state_dict({k: sd[k] for k in expected}, strict=True)
    log.info("loaded CAVP checkpoint %s (%d tensors, config %s)", path, len(expected), model.config.name)
