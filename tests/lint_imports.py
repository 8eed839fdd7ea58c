"""Run import-linter's layer contracts (``[tool.importlinter]`` in pyproject.toml) on a scratch copy.

``lint-imports`` in the repository root checks the checkout itself: the user-facing folders
``export/``, ``runtime/`` and ``triton_models/`` install as ``diffgap.export``, ``diffgap.runtime`` and
``diffgap.triton_models`` (``package-dir`` in pyproject.toml), and the links ``diffgap/export``,
``diffgap/runtime``, ``diffgap/triton_models`` show grimp, import-linter's graph builder, the same
layout (it walks a package's directory and follows links). The tests also need a tree they may add a
probe module to, to show that a breach is caught: :func:`mirror` lays out the installed package as
links in a temporary directory and :func:`lint` runs ``lint-imports`` there.
Usage: ``python tests/lint_imports.py`` (the same check as ``lint-imports``, on a scratch copy).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mirror(dest: Path) -> Path:
    """Symlink the installed layout of every package in pyproject.toml under ``dest``."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setup.get("package-dir", {})
    for pkg in sorted(setup["packages"], key=lambda p: p.count(".")):
        parts = pkg.split(".")
        src = ROOT / package_dir.get(pkg, pkg.replace(".", "/"))
        out = dest.joinpath(*parts)
        if out.is_symlink():  # a subpackage folder already linked inside its parent's folder
            out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):
            (out / f.name).symlink_to(f)
    return dest


def lint(tree: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` over a mirrored ``tree``; ``kw`` goes to :func:`subprocess.run`."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        raise SystemExit("lint_imports: `lint-imports` is not installed; run `pip install -e .[dev]`")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run([exe, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree, env=env, **kw)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="diffgap-layers-") as tmp:
        return lint(mirror(Path(tmp))).returncode


if __name__ == "__main__":
    sys.exit(main())
