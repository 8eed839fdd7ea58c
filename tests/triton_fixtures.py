"""Export directory + gallery index for the Triton tests (tests/test_triton_*.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffgap.manifest import Manifest
from diffgap.runtime import build_index

N_GALLERY = 24


def make_export(root: Path) -> Path:
    import runtime_graphs as rg

    rg.make_export(root, sampler_max_batch=16)
    return root


def make_index(export: Path, out: Path) -> Path:
    man = Manifest.load(export)
    rng = np.random.default_rng(11)
    audio = rng.standard_normal((N_GALLERY, man.embed_dim)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    ids = np.array([f"clip{i:03d}" for i in range(N_GALLERY)])
    return build_index(export, out, audio=audio, ids=ids)
