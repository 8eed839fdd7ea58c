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
