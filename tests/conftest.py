import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


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
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return f"TensorRT is not installed here ({type(e).__name__}); run on a GPU host with `pip install -e .[gpu]`"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return "no CUDA device visible"
    except Exception as e:
        return f"pycuda/CUDA driver unavailable ({type(e).__name__}: {e})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords:
            if not checked:
                reason, checked = _gpu_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
