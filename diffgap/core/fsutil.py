"""Atomic file and directory writes, and content hashes. Torch-free (the runtime uses it too).

Nothing the package writes is ever left half-written: files go to a temporary sibling and are
``os.replace``d into place; directories are built under a temporary sibling and renamed at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from diffgap.core.errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        raise OSError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output directory {parent} is not writable; choose another path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    _check_parent_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the final file the mode a plain open() would (0666 & ~umask).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_versioned_json(path: str | os.PathLike, fmt: str, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``"format"`` is ``fmt`` (manifests, checkpoint configs, engine
    metadata). Bad JSON or another format raises a one-line :class:`~diffgap.core.errors.UserError` naming ``what`` the file is
    and ending with ``fix``, the command that makes a good one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != fmt:
        raise UserError(f"{what} {path} has format {found!r}, expected {fmt!r}; {fix}")
    return doc


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete directory ``src`` at ``dst`` (same file system), replacing any ``dst``.

    An existing ``dst`` is renamed aside first and removed only after ``src`` is in place, so a crash
    leaves either the old or the new directory at ``dst`` (and at worst a ``.<name>.old`` sibling).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling; rename it to ``path`` only if the body succeeds.

    A failure leaves no partial directory behind (and an existing ``path`` untouched).
    """
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; pass --overwrite or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_parent_writable(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
