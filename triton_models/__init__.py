"""Triton serving for diffgap (import name ``diffgap.triton_models``).

- :mod:`.repository`   ``build_repository(export_dir, out, flavor=...)``: the model repository
  (``diffgap triton-repo``), every config generated from the export manifest's IOSpecs;
- :mod:`.python_model` the python-backend model template copied into generated repositories;
- :mod:`.server`       ``TritonServer``: the bundled tritonserver, started ready and always stopped
  (``diffgap serve``);
- :mod:`.demo`         ``demo_search``: the serving leg of ``make demo``;

Heavy imports stay lazy: importing this package pulls in numpy and the torch-free runtime only.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TritonServer", "build_repository", "demo_search", "DemoResult"]


def __getattr__(name: str) -> Any:
    if name == "TritonServer":
        from .server import TritonServer

        return TritonServer
    if name == "build_repository":
        from .repository import build_repository

        return build_repository
    if name in ("demo_search", "DemoResult"):
        from . import demo

        return getattr(demo, name)
    raise AttributeError(f"module 'diffgap.triton_models' has no attribute {name!r}")
