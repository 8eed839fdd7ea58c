"""The layer contracts in pyproject.toml hold on the package as installed, and import-linter would catch a breach."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lint_imports import lint  # noqa: E402


@pytest.fixture
def site_copy(installed_site, tmp_path):
    """A private copy of the installed tree that a test may add a probe module to."""
    return Path(shutil.copytree(installed_site, tmp_path / "site"))


def test_layer_contracts_hold(installed_site):
    r = lint(installed_site, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout
    # every contract names a layer that exists in the installed tree (a renamed folder would make a
    # contract vacuous rather than broken)
    for pkg in ("core", "runtime", "triton_models", "export", "encoders"):
        assert (installed_site / "diffgap" / pkg / "__init__.py").is_file(), pkg


def test_a_torch_import_in_the_runtime_breaks_a_contract(site_copy):
    (site_copy / "diffgap" / "runtime" / "_probe.py").write_text("import torch\n")
    r = lint(site_copy, capture_output=True, text=True)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and "diffgap.runtime._probe -> torch" in r.stdout


def test_a_core_module_importing_the_runtime_breaks_a_contract(site_copy):
    (site_copy / "diffgap" / "core" / "_probe.py").write_text("from diffgap.runtime import session\n")
    r = lint(site_copy, capture_output=True, text=True)
    assert r.returncode != 0 and "diffgap.core._probe -> diffgap.runtime" in r.stdout
