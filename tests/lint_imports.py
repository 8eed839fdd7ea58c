"""Install the package as a user gets it (a wheel, not editable) and run import-linter's layer contracts on it.

The user-facing folders ``export/``, ``runtime/`` and ``triton_models/`` install as ``diffgap.export``,
``diffgap.runtime`` and ``diffgap.triton_models`` (``package-dir`` in pyproject.toml). grimp,
import-linter's graph builder, finds a package with ``importlib`` and walks its folder on disk (following
links): in the checkout ``diffgap/export`` etc. are symbolic links to those folders, so plain
``lint-imports`` works there too; on the unpacked wheel it sees exactly what ships. :func:`install` builds and unpacks the wheel, :func:`lint` runs ``lint-imports``
over such a tree (the tests add a probe module to a copy of it to show a breach is caught).
Usage: ``python tests/lint_imports.py`` (what ``make lint`` runs).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install(dest: Path) -> Path:
    """Build the wheel of the checkout (no dependencies, no isolation) and unpack it; returns the site dir."""
    wheels = dest / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=dest)
    (whl,) = wheels.glob("diffgap-*.whl")
    site = dest / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    return site


def lint(site: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` with pyproject.toml's contracts over the package installed in ``site``."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        raise SystemExit("lint_imports: `lint-imports` is not installed; run `pip install -e .[dev]`")
    # import-linter puts its working directory first on sys.path: run it inside the installed tree so
    # the checkout's own `diffgap/` folder is never the one grimp walks.
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=site, env=env, **kw)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="diffgap-layers-") as tmp:
        return lint(install(Path(tmp))).returncode


if __name__ == "__main__":
    sys.exit(main())
