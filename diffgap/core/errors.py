"""Errors shared by every layer.

:class:`UserError` is a mistake the user can fix (a wrong path, a mismatched file, a bad flag); the
CLI prints its one-line message and exits 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """An error the user can fix; the CLI prints its one-line message (no traceback) and exits 2.

    A ``ValueError`` (a bad value the user gave), so callers that catch ``ValueError`` keep working;
    the CLI tells the two apart: a plain ``ValueError`` is a bug and keeps its traceback.
    """


class BackendUnavailable(UserError, RuntimeError):
    """The backend, device or engine the user chose cannot run on this machine (a provider missing from
    the onnxruntime build, no visible GPU, a TensorRT too old): one line naming what is missing and the
    choice that works. Also a ``RuntimeError``, so callers that catch that keep working."""


class MissingDependency(UserError, ImportError):
    """An optional package the chosen feature needs is not installed: one line naming the ``pip install``
    that adds it. Also an ``ImportError``, so callers that catch that keep working."""
