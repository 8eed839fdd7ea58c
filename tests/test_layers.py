"""The layer contracts in pyproject.toml hold, and import-linter would catch a breach."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lint_imports import lint, mirror  # noqa: E402


def test_lint_imports_passes_in_the_checkout():
    """The plain command a developer runs: `lint-imports` in the repository root."""
    import shutil
    import subprocess

    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    r = subprocess.run([exe, "--no-cache"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_layer_contracts_hold(tmp_path):
    r = lint(mirror(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_torch_import_in_the_runtime_breaks_a_contract(tmp_path):
    tree = mirror(tmp_path)
    (tree / "diffgap" / "runtime" / "_probe.py").write_text("import torch\n")
    r = lint(tree, capture_output=True, text=True)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and "diffgap.runtime._probe -> torch" in r.stdout


def test_a_core_module_importing_the_runtime_breaks_a_contract(tmp_path):
    tree = mirror(tmp_path)
    (tree / "diffgap" / "core" / "_probe.py").write_text("from diffgap.runtime import session\n")
    r = lint(tree, capture_output=True, text=True)
    assert r.returncode != 0 and "diffgap.core._probe -> diffgap.runtime" in r.stdout
