"""Every use of laion-clap internals, in one place, scoped, for the laion-clap version it was written for.

laion-clap 1.1.7 offers no public way to do three things diffgap needs, so while a context manager
below is active it replaces one module attribute each, and restores it on exit (site-packages is
never edited, nothing stays replaced after the ``with`` block):

* :func:`htsat_size` -- ``clap_module.model.create_htsat_model``: laion-clap hard-codes HTS-AT's
  widths per ``model_name`` (tiny/base/large); the replacement builds the same
  ``HTSAT_Swin_Transformer`` with the same fixed arguments (spec 256, patch 4, stride (4, 4),
  window 8) and the given ``embed_dim``/``depths``/``num_heads`` (reduced test/demo towers, and
  checkpoints whose HTS-AT sizes are not one of laion-clap's three).
* :func:`roberta_from_config` -- ``clap_module.model.RobertaModel``: laion-clap calls
  ``RobertaModel.from_pretrained('roberta-base')``, which downloads 500 MB of weights that a CLAP
  checkpoint overwrites right after; the replacement builds the tower from roberta-base's config.
* :func:`batch_agnostic_htsat` -- ``clap_module.htsat.window_reverse`` computes the batch size with
  ``int(windows.shape[0] / ...)``, which a tracer records as a Python constant, so an exported graph
  silently scrambles every batch size but the example's. The replacement is numerically identical
  and infers the batch axis (``view(-1, ...)``).

:func:`model_config` reads laion-clap's bundled ``model_configs/<name>.json`` files (package data)
instead of its private ``factory._MODEL_CONFIGS`` table.

Each patch checks first that the installed laion-clap is :data:`LAION_CLAP_VERSION` and refuses
another version with one line saying what to install: the replacements copy that version's code.
tests/test_laion_clap_patch.py compares each against the stock function it replaces.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

LAION_CLAP_VERSION = "1.1.7"

# The patches swap module globals shared by every thread: one lock for all of them.
_LOCK = threading.RLock()
_window_reverse_depth = 0
_window_reverse_stock: Any = None


def import_laion_clap():
    """laion-clap's ``(factory, htsat, model)`` modules, imported without hanging on the Hugging Face hub.

    laion-clap imports transformers, which probes the hub for minutes when offline; offline mode is
    forced unless the user opts in with ``DIFFGAP_ALLOW_HUB=1``.
    """
    if os.environ.get("DIFFGAP_ALLOW_HUB") != "1":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from laion_clap.clap_module import factory, htsat, model as clap_model
    except ImportError as e:
        raise ImportError(
            f"laion-clap is not importable ({e}); install the training extra: pip install -e '.[train]'"
        ) from e
    return factory, htsat, clap_model


def check_version() -> None:
    """Refuse a laion-clap other than :data:`LAION_CLAP_VERSION` (the patches copy its code)."""
    try:
        installed = metadata.version("laion_clap")
    except metadata.PackageNotFoundError:
        raise ImportError(f"laion-clap is not installed; pip install laion-clap=={LAION_CLAP_VERSION}") from None
    if installed != LAION_CLAP_VERSION:
        raise ImportError(
            f"diffgap's CLAP encoders replace laion-clap {LAION_CLAP_VERSION} internals (create_htsat_model, "
            f"RobertaModel, htsat.window_reverse) but laion-clap {installed} is installed; "
            f"pip install laion-clap=={LAION_CLAP_VERSION}"
        )


def model_config(name: str) -> dict:
    """A deep copy of laion-clap's bundled model config ``name`` (``HTSAT-tiny`` ...)."""
    factory, _, _ = import_laion_clap()
    path = Path(factory.__file__).parent / "model_configs" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ValueError(f"laion-clap has no model config {name!r}; known: {known}")
    return copy.deepcopy(json.loads(path.read_text()))


@contextlib.contextmanager
def htsat_size(overrides: dict) -> Iterator[None]:
    """While active, laion-clap's ``CLAP`` constructor builds an HTS-AT with ``overrides``
    (``embed_dim``, ``depths``, ``num_heads``) instead of its ``model_name``'s sizes."""
    check_version()
    _, htsat_mod, clap_model_mod = import_laion_clap()
    stock = clap_model_mod.create_htsat_model

    def create_sized_htsat(audio_cfg, enable_fusion=False, fusion_type="None"):
        # laion-clap 1.1.7 create_htsat_model's fixed arguments, every model_name alike.
        return htsat_mod.HTSAT_Swin_Transformer(
            spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=audio_cfg.class_num,
            window_size=8, config=audio_cfg, enable_fusion=enable_fusion, fusion_type=fusion_type,
            **overrides,
        )

    with _LOCK:
        clap_model_mod.create_htsat_model = create_sized_htsat
        try:
            yield
        finally:
            clap_model_mod.create_htsat_model = stock


@contextlib.contextmanager
def roberta_from_config(roberta_config: Any) -> Iterator[None]:
    """While active, laion-clap's ``RobertaModel.from_pretrained('roberta-base')`` returns
    ``RobertaModel(roberta_config)`` (random weights, no download)."""
    check_version()
    _, _, clap_model_mod = import_laion_clap()
    stock = clap_model_mod.RobertaModel

    class RobertaFromConfig:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return stock(roberta_config)

    with _LOCK:
        clap_model_mod.RobertaModel = RobertaFromConfig
        try:
            yield
        finally:
            clap_model_mod.RobertaModel = stock


def window_reverse_any_batch(windows, window_size: int, H: int, W: int):
    """laion-clap ``htsat.window_reverse`` with the batch axis inferred (``-1``) instead of ``int()``.

    windows: (nW*B, ws, ws, C) -> (B, H, W, C); identical values, but traceable for any batch.
    """
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


@contextlib.contextmanager
def batch_agnostic_htsat() -> Iterator[None]:
    """While active, laion-clap's ``htsat.window_reverse`` is :func:`window_reverse_any_batch`.

    Re-entrant and thread-safe (the last one out restores stock). The replacement is numerically
    identical, so concurrent eager callers are unaffected; it exists so that tracing
    (``torch.onnx.export``) records a dynamic batch axis.
    """
    global _window_reverse_depth, _window_reverse_stock
    check_version()
    _, htsat_mod, _ = import_laion_clap()
    with _LOCK:
        if _window_reverse_depth == 0:
            _window_reverse_stock = htsat_mod.window_reverse
            htsat_mod.window_reverse = window_reverse_any_batch
        _window_reverse_depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _window_reverse_depth -= 1
            if _window_reverse_depth == 0:
                htsat_mod.window_reverse = _window_reverse_stock
                _window_reverse_stock = None


@contextlib.contextmanager
def building_clap(htsat: dict | None = None, roberta_config: Any = None) -> Iterator[None]:
    """The patches :func:`~diffgap.encoders.clap_arch.build_clap_model` needs for one ``CLAP(...)`` call:
    :func:`htsat_size` when ``htsat`` is given, :func:`roberta_from_config` when a config is."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_LOCK)
        if htsat:
            stack.enter_context(htsat_size(htsat))
        if roberta_config is not None:
            stack.enter_context(roberta_from_config(roberta_config))
        yield
