import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


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
