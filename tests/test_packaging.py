"""What ships: the wheel holds every module and data file of the four source folders, imports on its own
(non-editable), and the sdist carries what `make test` needs."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUP["package-dir"]

# Modules that only import inside their host process: the Triton python backend's stub provides
# triton_python_backend_utils; the GPU extras provide the rest.
HOST_ONLY = {"triton_python_backend_utils", "tensorrt", "pycuda", "cuda"}


def _tracked(*folders: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--", *folders], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked-file list is unknown")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def _installed_path(source: str) -> str:
    """checkout path -> path inside the wheel, through pyproject's package-dir mapping."""
    top, _, rest = source.partition("/")
    for pkg, folder in PACKAGE_DIR.items():
        if folder == top:
            return "/".join([*pkg.split("."), rest])
    raise AssertionError(f"{source} is outside every package root")


def test_every_package_folder_is_listed():
    """A new subpackage folder that pyproject's explicit list misses would silently not ship."""
    listed = set(SETUP["packages"])
    for pkg, folder in PACKAGE_DIR.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([pkg, *rel.parts])
            assert name in listed, f"{init.parent} is a package but pyproject's [tool.setuptools] packages lacks {name!r}"


def test_checkout_links_each_mapped_folder_under_the_package():
    """In the checkout, diffgap/<name> links to each folder package-dir maps to diffgap.<name>, so tools
    that walk the package on disk (import-linter's grimp) see the layout the wheel installs."""
    for pkg, folder in PACKAGE_DIR.items():
        if pkg == "diffgap":
            continue
        link = ROOT.joinpath(*pkg.split("."))
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), (
            f"{link} must be a symbolic link to ../{folder} (`ln -s ../{folder} {link.relative_to(ROOT)}`)")


def test_wheel_holds_every_tracked_module_and_data_file(installed_site):
    sources = _tracked(*PACKAGE_DIR.values())
    assert sources
    missing = [s for s in sources if not (installed_site / _installed_path(s)).is_file()
               and (s.endswith(".py") or s.startswith(PACKAGE_DIR["diffgap.triton_models"] + "/"))]
    assert not missing, f"the wheel lacks {missing}"


def test_installed_package_imports_from_its_own_tree(installed_site):
    """Every module imports from the unpacked wheel alone (no editable finder, no checkout on the path)."""
    code = f"""
import importlib, json, pkgutil, sys
sys.path.insert(0, {str(installed_site)!r})
import diffgap
failed = {{}}
for m in pkgutil.walk_packages(diffgap.__path__, "diffgap."):
    try:
        mod = importlib.import_module(m.name)
        assert mod.__file__.startswith({str(installed_site)!r}), (m.name, mod.__file__)
    except ModuleNotFoundError as e:
        failed[m.name] = e.name
print(json.dumps(failed))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=installed_site, capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(name.split(".")[0] in HOST_ONLY for name in failed.values()), failed


def test_sdist_carries_the_tests_and_benchmarks(tmp_path):
    """`make test` and `make bench` run from an unpacked sdist: it carries tests/, benchmarks/ and the Makefile."""
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    name = r.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    wanted = _tracked("tests", "benchmarks", *PACKAGE_DIR.values()) + ["Makefile", "pyproject.toml", "README.md"]
    missing = sorted(set(wanted) - members)
    assert not missing, f"the sdist lacks {missing[:10]}"
