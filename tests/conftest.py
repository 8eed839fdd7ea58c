import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

# Top-level packages of the optional extras (pyproject.toml: train, export, serving, bench). A test
# module whose import fails because one of these is not installed is *skipped* with that reason, as
# if it began with ``pytest.importorskip``: the GPU smoke run (``pytest -m gpu tests``) runs in a
# venv with TensorRT but without torch, and pytest imports every module before ``-m gpu`` selects
# tests, so one module importing torch would otherwise stop the whole run with a collection error.
# Only a missing *top-level* package counts, and only in a run that selects the GPU tests (``-m gpu``):
# in ``make test`` every extra is installed, so a missing one is a broken install and must fail.
OPTIONAL_PACKAGES = {
    "torch": "train", "torchvision": "train", "laion_clap": "train", "safetensors": "train", "tqdm": "train",
    "av": "train", "onnx": "export", "onnxscript": "export", "onnxslim": "export", "modelopt": "export",
    "pytriton": "serving", "tritonclient": "serving", "matplotlib": "bench", "psutil": "bench",
    "diffusers": "generate", "transformers": "generate",
}


def _missing_optional(exc: BaseException | None) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name in OPTIONAL_PACKAGES:
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


class _OptionalDepsModule(pytest.Module):
    def collect(self):
        try:
            return super().collect()
        except pytest.Collector.CollectError as e:
            name = _missing_optional(e)
            if name is None or "gpu" not in (self.config.getoption("markexpr") or ""):
                raise
            pytest.skip(f"{self.path.name} needs {name} (`pip install -e .[{OPTIONAL_PACKAGES[name]}]`), not installed here",
                        allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    return _OptionalDepsModule.from_parent(parent, path=module_path)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny test models gain nothing from intra-op threads, and on a loaded 2-core box OpenMP barriers
    make each small op ~100x slower with 2 threads; restore the setting after each test."""
    try:
        import torch
    except ImportError:  # a lean runtime-only install
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gpu_reason() -> str | None:
    from diffgap.runtime.trt_session import unavailable_reason

    return unavailable_reason()


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        # the marker itself, not item.keywords: keywords also hold every parent node's name, so a
        # checkout in a folder called "gpu" would mark every test
        if item.get_closest_marker("gpu") is not None:
            if not checked:
                reason, checked = _gpu_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def installed_site(tmp_path_factory):
    """The package as a user installs it: the checkout's wheel, built once per run and unpacked.

    Used by the layer contracts (import-linter walks the installed layout) and the packaging tests.
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lint_imports import install

    return install(tmp_path_factory.mktemp("wheel-install"))
