"""One tiny CAVP export per test session, shared by tests/test_cavp_export.py and tests/test_triton_cavp.py."""
from __future__ import annotations

from pathlib import Path

STEPS = 4
_CACHE: dict[str, object] = {}


def make_checkpoint(root: Path) -> Path:
    """A cavp-tiny DiffGAP with randomised weights (fresh zero-initialised output layers would make the
    sampler trivial), saved as a checkpoint directory."""
    import torch

    from diffgap.checkpoint import save_checkpoint
    from diffgap.config import get_preset
    from diffgap.models import DiffGAP

    torch.manual_seed(0)
    model = DiffGAP(get_preset("cavp-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(root / "checkpoint", model)


def shared_export(tmp_path_factory):
    """(checkpoint dir, ExportResult): the real export pipeline with the ``tiny`` CAVP encoders, K = 4,
    FP32 + FP16, parity checks on (read-only: a test that changes it works on a copy)."""
    if "export" not in _CACHE:
        from diffgap.export.cli import export_all

        root = tmp_path_factory.mktemp("cavp_export")
        ckpt = make_checkpoint(root)
        _CACHE["export"] = (ckpt, export_all(ckpt, root / "export", steps=STEPS, encoders="tiny", check=True))
    return _CACHE["export"]
