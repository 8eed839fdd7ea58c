"""The paired-embedding file format (``.npz``) and its validated loader. numpy only (no torch).

An ``.npz`` holds one split of paired embeddings, row i of every array describing the same item:

    audio     (N, E_audio) float  audio embeddings (CLAP/CAVP or any encoder)
    text      (N, E_text)  float  text embeddings                 } at least two modality arrays
    video     (N, E_video) float  video embeddings (optional)     }
    ids       (N,)   str    unique item ids
    captions  (N,)   str    the caption each text row encodes (optional)
    encoder   ()     str    JSON identity of the encoder that made the embeddings (optional; written by
                            ``diffgap embed --hf-clap``, recorded in checkpoints, checked by ``diffgap generate``)

Each modality has its own width E (384, 512, 768, ...; they may differ). Floats may be stored as float16/32/64 and are loaded as float32. ``load_pairs`` refuses anything
else with a one-line error that names the array (and, for NaN/Inf, the first bad row).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import UserError
from .fsutil import atomic_path

MODALITY_KEYS = ("audio", "text", "video")
OTHER_KEYS = ("ids", "captions", "encoder")


@dataclass
class Pairs:
    """One split of paired embeddings. ``embeddings[m]``: (N, E_m) float32 for each modality m."""

    embeddings: dict[str, np.ndarray]
    ids: np.ndarray                         # (N,) str
    captions: np.ndarray | None = None      # (N,) str
    path: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    encoder: dict | None = None             # identity of the encoder that made the embeddings

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dims(self) -> dict[str, int]:
        """``{modality: E}``, the width of each modality's embeddings."""
        return {m: int(v.shape[1]) for m, v in self.embeddings.items()}

    @property
    def embed_dim(self) -> int:
        """The common width of every modality (a ``ValueError`` where they differ: use :attr:`dims`)."""
        widths = set(self.dims.values())
        if len(widths) != 1:
            raise ValueError(f"{self.path or 'pairs'} has modalities of different widths {self.dims}; use Pairs.dims")
        return widths.pop()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.embeddings)

    def __getitem__(self, modality: str) -> np.ndarray:
        if modality not in self.embeddings:
            raise KeyError(f"{self.path or 'pairs'} has no {modality!r} embeddings; it has {list(self.embeddings)}")
        return self.embeddings[modality]

    def subset(self, idx: np.ndarray) -> "Pairs":
        return Pairs(
            {m: v[idx] for m, v in self.embeddings.items()}, self.ids[idx],
            None if self.captions is None else self.captions[idx], self.path,
        )


def _check_finite(name: str, x: np.ndarray, path: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0][0])
        raise UserError(f"{path}: array {name!r} contains NaN/Inf (first bad row {row}); clean or drop that row and save again")


def validate_arrays(
    arrays: dict[str, np.ndarray], path: str = "pairs", embed_dim: int | Mapping[str, int] | None = None,
    require: tuple[str, ...] = (),
) -> Pairs:
    """Check a dict of arrays against the format; return a :class:`Pairs` (float32 embeddings).

    ``embed_dim``: the width every modality must have, or ``{modality: width}`` (a model's input
    widths; modalities it does not name are free), or None (each modality's own).
    """
    mods = {k: arrays[k] for k in MODALITY_KEYS if k in arrays}
    if len(mods) < 2:
        raise UserError(f"{path}: needs at least two of {MODALITY_KEYS} arrays, found {sorted(arrays)}; write it with `diffgap embed` or diffgap.core.data.save_pairs")
    for r in require:
        if r not in mods:
            raise UserError(f"{path}: array {r!r} is required here but missing (it has {sorted(mods)})")
    n = None
    out: dict[str, np.ndarray] = {}
    for name, x in mods.items():
        if x.ndim != 2:
            raise UserError(f"{path}: array {name!r} must have rank 2 (N, E), got shape {x.shape}")
        if x.dtype.kind != "f":
            raise UserError(f"{path}: array {name!r} has dtype {x.dtype}, expected float16/32/64 embeddings")
        dim = embed_dim.get(name) if isinstance(embed_dim, Mapping) else embed_dim
        if dim is not None and x.shape[1] != dim:
            raise UserError(f"{path}: array {name!r} has embedding dim {x.shape[1]}, but the model takes {dim}-d {name} "
                            "embeddings; pass data embedded by the encoder the model was trained on")
        if n is None:
            n = x.shape[0]
        if x.shape[0] != n:
            raise UserError(f"{path}: array {name!r} has {x.shape[0]} rows but {next(iter(mods))!r} has {n}; pairs must line up row by row")
        if n == 0:
            raise UserError(f"{path}: array {name!r} is empty")
        _check_finite(name, x, path)
        out[name] = np.ascontiguousarray(x, dtype=np.float32)
    assert n is not None
    if "ids" not in arrays:
        raise UserError(f"{path}: array 'ids' is missing; save one unique id per row")
    ids = arrays["ids"]
    if ids.ndim != 1 or len(ids) != n:
        raise UserError(f"{path}: array 'ids' must have shape ({n},), got {ids.shape}")
    if ids.dtype.kind not in "USiu":
        raise UserError(f"{path}: array 'ids' has dtype {ids.dtype}, expected strings or ints")
    ids = ids.astype(str)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != n:
        dup = uniq[counts > 1][0]
        raise UserError(f"{path}: array 'ids' has duplicates (first: {dup!r} at row {int(np.argmax(ids == dup))}); ids must be unique")
    captions = arrays.get("captions")
    if captions is not None:
        if captions.ndim != 1 or len(captions) != n:
            raise UserError(f"{path}: array 'captions' must have shape ({n},), got {captions.shape}")
        if captions.dtype.kind not in "US":
            raise UserError(f"{path}: array 'captions' has dtype {captions.dtype}, expected strings")
        captions = captions.astype(str)
    encoder = None
    if "encoder" in arrays:
        try:
            encoder = json.loads(str(arrays["encoder"]))
        except ValueError:
            raise UserError(f"{path}: array 'encoder' is not a JSON string; rewrite the file with `diffgap embed`") from None
        if not isinstance(encoder, dict):
            raise UserError(f"{path}: array 'encoder' must hold a JSON object; rewrite the file with `diffgap embed`")
    return Pairs(out, ids, captions, path, encoder=encoder)


def load_pairs(path: str | Path, embed_dim: int | Mapping[str, int] | None = None, require: tuple[str, ...] = ()) -> Pairs:
    """Load and validate a paired-embedding ``.npz`` (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; create it with `diffgap synth` or `diffgap embed`")
    if not zipfile.is_zipfile(path):  # np.load would otherwise try (and refuse) to unpickle it
        raise UserError(f"{path} is not a readable .npz file (not a zip archive); regenerate it")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e}); regenerate it") from None
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise UserError(f"{path}: {e}; store ids/captions as fixed-width strings, not objects") from None
    return validate_arrays(arrays, str(path), embed_dim, require)


def save_pairs(
    path: str | Path,
    *,
    ids: np.ndarray | list,
    audio: np.ndarray | None = None,
    text: np.ndarray | None = None,
    video: np.ndarray | None = None,
    captions: np.ndarray | list | None = None,
    encoder: dict | None = None,
) -> Path:
    """Validate, then write the ``.npz`` atomically (float32 embeddings, unicode ids/captions)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"ids": np.asarray(ids).astype(str)}
    for k, v in (("audio", audio), ("text", text), ("video", video)):
        if v is not None:
            arrays[k] = np.asarray(v)
    if captions is not None:
        arrays["captions"] = np.asarray(captions).astype(str)
    if encoder is not None:
        arrays["encoder"] = np.asarray(json.dumps(encoder, sort_keys=True))
    pairs = validate_arrays(arrays, str(path))
    payload = {**pairs.embeddings, "ids": pairs.ids}
    if encoder is not None:
        payload["encoder"] = arrays["encoder"]
    if pairs.captions is not None:
        payload["captions"] = pairs.captions
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops np.savez appending ".npz" to the temp name
            np.savez(f, **payload)
    return path
