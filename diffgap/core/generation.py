"""Seeds -> noise for generation, and the generation defaults. Torch-free (numpy only).

The bridge's K-step samples and the generator's latents are both drawn from seeds, so the same
seed gives the same condition and the same waveform in-process (torch), in the torch-free runtime
and in Triton:

* the bridge's initial noise for caption b: ``numpy.random.default_rng(seed_b)`` (PCG64) draws
  ``standard_normal((n, D))`` and sample j is row j (one int seed s means s + b for caption b). Sample 0
  equals the retrieval runtime's ``make_noise(seed_b)`` row, and the first n rows never depend on how
  many samples were asked for;
* the generator's latent noise for sample j of a caption seeded ``seed``: a ``torch.Generator``
  seeded with :func:`latent_seed` (``SeedSequence([seed, j])``), one generator per waveform, so a
  waveform depends only on its own seed and index, never on the batch it was generated in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# The generation sampler's defaults (the export's baked K and default guidance). Chosen on the
# raw-space prior table of `diffgap eval` (the figures are in its output).
GEN_STEPS = 10
GEN_GUIDANCE = 1.0


def caption_seeds(seeds: int | Sequence[int] | np.ndarray, batch: int) -> np.ndarray:
    """One non-negative int64 seed per caption; one int ``s`` gives caption b the seed ``s + b``.

    Distinct seeds matter: captions sharing a seed share their bridge noise, which correlates their
    samples (measured on the raw-space prior table: one seed for all 1,000 test captions moved the
    samples' mean far off the real audio mean).
    """
    s = np.asarray(seeds, dtype=np.int64)
    if s.ndim == 0:
        s = int(s) + np.arange(batch, dtype=np.int64)
    if s.shape != (batch,):
        raise ValueError(f"seeds must be one int or {batch} ints, got shape {s.shape}")
    if (s < 0).any():
        raise ValueError("seeds must be non-negative integers")
    return s


def generation_noise(seeds: int | Sequence[int] | np.ndarray, batch: int, n: int, dim: int) -> np.ndarray:
    """Initial bridge noise ``(batch, n, dim)`` float32: caption b's block from ``default_rng(seed_b)``."""
    if n < 1:
        raise ValueError(f"n (samples per caption) must be >= 1, got {n}")
    s = caption_seeds(seeds, batch)
    out = np.empty((batch, n, dim), dtype=np.float32)
    for b, seed in enumerate(s.tolist()):
        out[b] = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return out


def latent_seed(seed: int, index: int) -> int:
    """Seed of the generator's latent noise for waveform ``index`` of a caption seeded ``seed`` (< 2**63)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed}, {index}")
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
