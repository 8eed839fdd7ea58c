"""Resumable work beside an output: one fingerprinted work directory per output. numpy only.

A long job that writes ``OUT`` (``diffgap embed``'s ``.npz``, ``diffgap index``'s directory) works in
the sibling ``.OUT.<kind>/``: a :class:`WorkDir` holding ``state.npz`` (a fingerprint of every input
and setting, json-able progress, arrays such as running sums) and the job's pieces (shards, or a
pre-allocated memory-mapped file). Every write is atomic, so an interrupted job leaves a consistent
directory: rerun with the same inputs it resumes (:meth:`WorkDir.open` says ``"resumed"``); with other
inputs the stale directory is discarded and the job starts over. The job renames or assembles its
result into ``OUT`` at the end and removes the directory, so ``OUT`` is never half-written.

Two ways of cutting the work use it: independent shards, each one file, done when present
(:meth:`WorkDir.run_shards`: the embedding job), and sequential chunks whose running state is saved
after each one (:meth:`WorkDir.save`: the index build's moments and rows done).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .fsutil import atomic_path

log = logging.getLogger(__name__)

STATE = "state.npz"


def fingerprint(settings: Mapping[str, Any], arrays: Sequence[np.ndarray | None] = (), lines: Iterable[str] = ()) -> str:
    """sha256 of json-able ``settings``, the dtype, shape and bytes of each of ``arrays`` (None counts)
    and each of ``lines``: what decides whether a work directory belongs to the same job."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for a in arrays:
        h.update(b"|" if a is None else repr((a.dtype.str, a.shape)).encode())
        if a is not None:
            flat = a.reshape(len(a), -1) if a.ndim else a.reshape(1)
            for s in range(0, len(flat), 1 << 16):  # blocks: a catalogue-sized array is never copied whole
                h.update(np.ascontiguousarray(flat[s:s + (1 << 16)]).tobytes())
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()


class WorkDir:
    """``.OUT.<kind>/`` beside ``out``: the state (``info`` json-able, ``arrays``) and the pieces of one job."""

    def __init__(self, out: str | Path, kind: str, fingerprint: str) -> None:
        out = Path(out)
        self.path = out.parent / f".{out.name}.{kind}"
        self.fingerprint = fingerprint
        self.info: dict[str, Any] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def open(self) -> str:
        """Resume this job's directory (``"resumed"``), or start a fresh one: ``"new"``, or
        ``"discarded"`` where an interrupted job of other inputs was there (the caller reports which)."""
        status = "new"
        if self.path.exists():
            if self._load():
                return "resumed"
            shutil.rmtree(self.path)
            status = "discarded"
        self.path.mkdir(parents=True)
        self.info, self.arrays = {}, {}
        self.save()
        return status

    def _load(self) -> bool:
        try:
            with np.load(self.path / STATE, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            doc = json.loads(str(arrays.pop("state")))
        except (OSError, ValueError, KeyError, EOFError):
            return False
        if doc.get("fingerprint") != self.fingerprint:
            return False
        self.info, self.arrays = doc.get("info", {}), arrays
        return True

    def save(self) -> None:
        """Replace ``state.npz`` (fingerprint, ``info``, ``arrays``) atomically."""
        doc = json.dumps({"fingerprint": self.fingerprint, "info": self.info})
        with atomic_path(self.path / STATE) as tmp, open(tmp, "wb") as f:
            np.savez(f, state=np.array(doc), **self.arrays)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_arrays(self, name: str, **arrays: np.ndarray) -> Path:
        """Write ``name`` (an ``.npz``) atomically."""
        with atomic_path(self.path / name) as tmp, open(tmp, "wb") as f:  # a file object: no ".npz" appended to tmp
            np.savez(f, **arrays)
        return self.path / name

    def done(self, names: Sequence[str]) -> int:
        """How many of the shards ``names`` are written."""
        return sum((self.path / n).exists() for n in names)

    def run_shards(self, names: Sequence[str], make: Callable[[str], Mapping[str, np.ndarray]],
                   on_shard: Callable[[str], None] | None = None) -> int:
        """Write each shard ``name`` (an ``.npz`` of ``make(name)``) that is not there yet, in order;
        ``on_shard(name)`` after each. Returns how many were already done."""
        todo = [n for n in names if not (self.path / n).exists()]
        if len(todo) < len(names):
            log.info("resuming: %d of %d shards already done in %s", len(names) - len(todo), len(names), self.path)
        try:
            for name in todo:
                self.write_arrays(name, **make(name))
                if on_shard is not None:
                    on_shard(name)
        except KeyboardInterrupt:
            done = self.done(names)
            log.warning("interrupted: %d of %d shards kept in %s; rerun the same command to resume", done, len(names), self.path)
            raise
        return len(names) - len(todo)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
