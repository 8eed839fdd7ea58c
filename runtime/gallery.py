"""The gallery index: a directory with a versioned manifest and memory-mapped arrays. numpy only.

Layout (``diffgap-index/2``)::

    INDEX/manifest.json          model identity, seed, fusion weights at build time, engine + parameters,
                                 per side: counts, block dims, files with their sizes (stats: sha256)
    INDEX/<side>_ids.npy         (N,) unicode ids, memory-mapped          side: "audio", and "text" with captions
    INDEX/<side>_vectors.npy     (N, E + 2D) float32 shifted gallery vectors V (see diffgap.runtime.fusion);
                                 only the blocks a weighted term reads (manifest: per side "spaces")
    INDEX/<side>_stats.npz       shift c, mean of V, one covariance per block (float64)
    INDEX/text_captions.npy      (M,) caption strings
    INDEX/<side>.<engine files>  what the engine built (a FAISS index file; Milvus keeps its own storage)

:func:`build_index` (in :mod:`.gallery_build`) writes it; :class:`GalleryIndex` opens it. An index of
the older single-file ``.npz`` format is refused with the command that rebuilds it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffgap.core.errors import UserError
from diffgap.core.fsutil import read_versioned_json, sha256_file
from diffgap.core.manifest import Manifest
from diffgap.core.names import MANIFEST

from .fusion import SPACES

INDEX_FORMAT = "diffgap-index/2"
SIDES = ("audio", "text")


class SearchError(UserError, ValueError):
    """A bad, foreign or damaged gallery index, or a bad search request: a one-line message with the fix
    (a :class:`UserError` for the CLI, and a ``ValueError`` for API callers)."""


REBUILD = "rebuild it with `diffgap index EXPORT_DIR --npz PAIRS.npz --out INDEX_DIR`"


def model_identity(man: Manifest, head_dim: int) -> dict[str, Any]:
    return {"checkpoint_sha256": man.checkpoint_sha256, "preset": man.preset, "embed_dim": man.embed_dim, "head_dim": head_dim}


def side_files(side: str) -> dict[str, str]:
    files = {"ids": f"{side}_ids.npy", "vectors": f"{side}_vectors.npy", "stats": f"{side}_stats.npz"}
    if side == "text":
        files["captions"] = "text_captions.npy"
    return files


@dataclass
class GallerySide:
    """One searchable side of an index: ``ids (N,)``, ``vectors (N, E + 2D)`` (memory-mapped; only the
    blocks of :attr:`spaces`) and the gallery statistics (:meth:`diffgap.runtime.fusion.Moments.stats`
    plus ``shift``)."""

    name: str
    root: Path
    info: dict[str, Any]
    ids: np.ndarray
    vectors: np.ndarray
    stats: dict[str, np.ndarray]
    captions: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def blocks(self) -> tuple[int, ...]:
        """The widths of the kept blocks, one per :attr:`spaces` entry."""
        return tuple(int(b) for b in self.info["blocks"])

    @property
    def spaces(self) -> tuple[str, ...]:
        """The blocks of ``("clap", "head", "bridged")`` the vectors keep (indexes written before
        blocks could be left out keep all three)."""
        return tuple(self.info.get("spaces", SPACES))

    def raw(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The unit gallery embeddings (x, h, b) the vectors were made from, None for a block left out
        (in memory: small galleries)."""
        v = np.asarray(self.vectors, np.float64) + self.stats["shift"]
        cuts = np.cumsum((0,) + self.blocks)
        kept = {s: v[:, a:b] for s, a, b in zip(self.spaces, cuts[:-1], cuts[1:])}
        return kept.get("clap"), kept.get("head"), kept.get("bridged")


class GalleryIndex:
    """A gallery index directory opened for search (arrays memory-mapped, nothing read eagerly)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self._sides: dict[str, GallerySide] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GalleryIndex":
        path = Path(path)
        if path.is_file():
            raise SearchError(f"{path} is an index of the older single-file format; {REBUILD.replace('INDEX_DIR', str(path.with_suffix('')))}")
        mpath = path / MANIFEST
        if not mpath.is_file():
            if path.is_dir() and any(path.glob("*_vectors.npy")):
                raise SearchError(f"index {path} has no {MANIFEST} (an interrupted or damaged build); {REBUILD}")
            raise FileNotFoundError(f"index {path} not found; build it with `diffgap index EXPORT_DIR ... --out {path}`")
        meta = read_versioned_json(mpath, INDEX_FORMAT, "index manifest", REBUILD)
        ix = cls(path, meta)
        for side in ix.sides:
            ix._check_files(side)
        return ix

    @property
    def sides(self) -> list[str]:
        return [s for s in SIDES if s in self.meta.get("sides", {})]

    @property
    def has_captions(self) -> bool:
        return "text" in self.meta.get("sides", {})

    @property
    def count(self) -> int:
        return int(self.meta["sides"]["audio"]["count"])

    @property
    def engine(self) -> dict[str, Any]:
        return dict(self.meta["engine"])

    def _check_files(self, side: str) -> None:
        info = self.meta["sides"][side]
        for role, name in info["files"].items():
            f = self.path / name
            want = info["bytes"][role]
            have = f.stat().st_size if f.is_file() else None
            if have != want:
                what = "missing" if have is None else f"{have} bytes, expected {want} (truncated or altered)"
                raise SearchError(f"index file {f} is {what}; {REBUILD}")
        for role, digest in info.get("sha256", {}).items():
            if sha256_file(self.path / info["files"][role]) != digest:
                raise SearchError(f"index file {self.path / info['files'][role]} is corrupt (checksum mismatch); {REBUILD}")

    def side(self, name: str) -> GallerySide:
        if name not in self.meta["sides"]:
            if name == "text":
                raise SearchError(f"index {self.path} has no captions; rebuild it with captions (`diffgap index --npz` with a text array)")
            raise ValueError(f"unknown gallery side {name!r}; use one of {SIDES}")
        if name not in self._sides:
            info = self.meta["sides"][name]
            files = info["files"]
            try:
                ids = np.load(self.path / files["ids"], mmap_mode="r", allow_pickle=False)
                vec = np.load(self.path / files["vectors"], mmap_mode="r", allow_pickle=False)
                with np.load(self.path / files["stats"], allow_pickle=False) as z:
                    stats = {k: z[k] for k in z.files}
                caps = np.load(self.path / files["captions"], mmap_mode="r", allow_pickle=False) if "captions" in files else None
            except (OSError, ValueError, EOFError) as e:
                raise SearchError(f"index {self.path} ({name} side) is unreadable ({str(e).splitlines()[0]}); {REBUILD}") from None
            n, dim = int(info["count"]), int(info["dim"])
            if vec.shape != (n, dim) or vec.dtype != np.float32 or ids.shape != (n,) or (caps is not None and caps.shape != (n,)):
                raise SearchError(f"index {self.path} ({name} side): arrays do not match the manifest (vectors {vec.shape}, "
                                f"ids {ids.shape}, expected ({n}, {dim})); {REBUILD}")
            self._sides[name] = GallerySide(name, self.path, info, ids, vec, stats, caps)
        return self._sides[name]

    def check_model(self, man: Manifest, head_dim: int) -> None:
        """Refuse an index made by another model (dims, preset or checkpoint differ)."""
        want = model_identity(man, head_dim)
        have = self.meta["model"]
        diff = [f"{k} {have.get(k)!r} (index) vs {want[k]!r} (export)" for k in want if have.get(k) != want[k]]
        if diff:
            raise SearchError(f"index {self.path} was built with another model: {'; '.join(diff)}; rebuild it with `diffgap index` for this export")

    def describe(self) -> str:
        e = self.meta["engine"]
        params = ", ".join(f"{k}={v}" for k, v in sorted(e.get("params", {}).items()) if k != "files")
        caps = self.meta["sides"].get("text", {}).get("count", 0)
        return f"{self.path}: {self.count} gallery items, {caps} captions, engine {e['name']}" + (f" ({params})" if params else "")


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
