"""This machine's fp32 matrix-multiply rate through torch: what ``make demo`` prints beside its timings
and the torch half of the benchmarks' sgemm peak (``benchmarks/roofline.py``)."""
from __future__ import annotations

import time

import numpy as np


def torch_matmul_gflops(n: int = 2048, repeats: int = 5, a: np.ndarray | None = None, b: np.ndarray | None = None) -> float:
    """GFLOP/s of an (n x n) @ (n x n) float32 ``torch.mm`` on torch's current threads, best of ``repeats``
    after one warm-up (``a``, ``b``: the operands, float32 (n, n); random when omitted)."""
    import torch

    ta = torch.from_numpy(a) if a is not None else torch.randn(n, n)
    tb = torch.from_numpy(b) if b is not None else torch.randn(n, n)
    n = ta.shape[0]
    out = torch.empty(n, tb.shape[1])
    best = float("inf")
    with torch.inference_mode():
        torch.mm(ta, tb, out=out)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(ta, tb, out=out)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n * ta.shape[1] * tb.shape[1] / best / 1e9
