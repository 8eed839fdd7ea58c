"""Parity checks of exported graphs against PyTorch (``diffgap export --check`` and the tests).

The bounds, and exactly what each figure measures:

* **FP32 graph vs PyTorch FP32** (every model): max abs difference over all rows and batch sizes,
  ONNX Runtime CPU, bound :data:`FP32_MAX_ABS` = 1e-4 (float32 rounding across a few hundred ops is
  ~1e-6; anything near 1e-4 means a real graph difference such as a frozen batch axis).
* **FP16 graph vs PyTorch FP32, denoisers** (fused samplers): per-row cosine, minimum over rows,
  bound :data:`FP16_MIN_COS_DENOISER` = 0.999, measured with ``onnx.reference.ReferenceEvaluator``,
  which executes every FP16 node in numpy float16 (real FP16 rounding of every activation; its dot
  products accumulate in higher precision, as TensorRT's tensor cores do). ONNX Runtime CPU would not
  do: its profiler shows every Gemm/MatMul/Softmax/Add of an FP16 graph running on float32 kernels
  after inserted Casts, so it measures only the rounding of weights and constants.
* **FP16 graph vs PyTorch FP32, encoders**: per-row cosine, minimum over rows, bound
  :data:`FP16_MIN_COS_ENCODER` = 0.995. The **text encoder** is measured with the reference evaluator
  (real FP16 arithmetic). The **audio encoder** is measured with **ONNX Runtime CPU**, so its figure
  measures the rounding of weights/constants to FP16 and of every tensor that crosses an FP16 Cast,
  *not* FP16 arithmetic inside Gemm/MatMul/Conv (ORT CPU computes those in float32): the reference
  evaluator executes convolutions in plain numpy, far too slow for the STFT convolutions and Swin
  blocks of a 10 s clip. The audio tower's FP16 arithmetic is checked on a GPU host by
  ``tests/test_export_gpu.py`` (``@pytest.mark.gpu``, TensorRT strongly typed engines).
  Both **CAVP towers** (video ResNet3D, audio mel + Cnn14) are measured with ORT CPU as well, so the
  same caveat applies: the reference evaluator's numpy 3-D convolutions are far too slow at full size.

Encoder parity runs at B = 1, 3 and 8: graphs are traced at B = 2, so a batch size frozen into the
graph (laion-clap HTS-AT's ``window_reverse``) fails at every other size.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from diffgap.core.iospec import ROLE_CONDITION, ROLE_GUIDANCE, IOSpec

log = logging.getLogger(__name__)

FP32_MAX_ABS = 1e-4
FP16_MIN_COS_DENOISER = 0.999
FP16_MIN_COS_ENCODER = 0.995
BATCHES = (1, 3, 8)

MEASURE_FP32 = "ORT CPU fp32 vs torch fp32, max abs"
MEASURE_FP16_REF = "onnx.reference (numpy float16 arithmetic) vs torch fp32, min row cosine"
MEASURE_FP16_ORT = "ORT CPU on fp16 graph (fp16 weights/casts, fp32 kernels) vs torch fp32, min row cosine"


@dataclass
class Parity:
    """Figures of one model (one row of the parity table)."""

    model: str
    kind: str                         # "denoiser" | "encoder"
    batches: tuple[int, ...]
    fp32_max_abs: float
    fp16_min_cos: float | None = None
    fp16_max_abs: float | None = None
    fp16_measure: str = ""
    fp32_bound: float = FP32_MAX_ABS
    fp16_bound: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        ok = self.fp32_max_abs <= self.fp32_bound
        if self.fp16_min_cos is not None and self.fp16_bound is not None:
            ok = ok and self.fp16_min_cos >= self.fp16_bound
        return bool(ok)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batches"] = list(self.batches)
        d["ok"] = self.ok
        return d


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per row.  a, b: (B, D) -> (B,)."""
    a = a.astype(np.float64).reshape(len(a), -1)
    b = b.astype(np.float64).reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    # Two (near-)zero rows agree: an untrained sampler (zero-initialised output layer) returns zero
    # vectors, and reporting cosine 0 there would fail `--check` on a correct graph.
    both_zero = (na < 1e-6) & (nb < 1e-6)
    return np.where(both_zero, 1.0, cos)


def ort_session(path: str | Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def reference_session(path: str | Path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(str(path)))


def torch_forward(module, io: IOSpec, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``module`` (in IOSpec order) as numpy arrays."""
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in io.input_names))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) != len(io.outputs):
        raise ValueError(f"{io.name}: module returned {len(outs)} outputs, the IOSpec declares {io.output_names}")
    return [o.detach().cpu().numpy() for o in outs]


def _outputs(sess, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in sess.run(None, dict(feeds))]


def denoiser_feeds(io: IOSpec, batch: int, seed: int, guidance: Sequence[float] = (1.0, 3.0)) -> dict[str, np.ndarray]:
    """IOSpec sample inputs with unit-norm conditions (as CLAP emits) and per-row guidance scales."""
    feeds = io.sample_inputs(batch, seed=seed)
    cond = io.role(ROLE_CONDITION).name  # tensors by role (the sampler's IOSpec), never by a retyped name
    c = feeds[cond]
    feeds[cond] = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    if io.has_role(ROLE_GUIDANCE):
        g = io.role(ROLE_GUIDANCE)
        feeds[g.name] = np.array([[guidance[i % len(guidance)]] for i in range(batch)], g.np_dtype)
    return feeds


def check_model(
    module,
    io: IOSpec,
    fp32_path: str | Path,
    fp16_path: str | Path | None,
    *,
    kind: str,
    fp16_backend: str | None = None,
    batches: Sequence[int] = BATCHES,
    feeds_fn: Callable[[int, int], dict[str, np.ndarray]] | None = None,
) -> Parity:
    """Parity of one exported model (FP32 and, if given, FP16) against its PyTorch module.

    Figures are over every output the IOSpec declares (the samplers' ``embedding`` and
    ``source_embedding``), every row and every batch size.

    ``kind``: ``"denoiser"`` (bound 0.999) or ``"encoder"`` (bound 0.995). ``fp16_backend``:
    ``"reference"`` (onnx.reference, real FP16 arithmetic; default for denoisers) or ``"ort"`` (ORT CPU,
    weight/cast rounding only; default for encoders). ``feeds_fn(batch, seed)`` makes inputs
    (default: the IOSpec's samples; :func:`denoiser_feeds` for denoisers).
    """
    if kind not in ("denoiser", "encoder"):
        raise ValueError(f"kind must be 'denoiser' or 'encoder', got {kind!r}")
    if fp16_backend is None:
        fp16_backend = "reference" if kind == "denoiser" else "ort"
    if fp16_backend not in ("reference", "ort"):
        raise ValueError(f"fp16_backend must be 'reference' or 'ort', got {fp16_backend!r}")
    if feeds_fn is None:
        feeds_fn = (lambda b, s: denoiser_feeds(io, b, s)) if kind == "denoiser" else (lambda b, s: io.sample_inputs(b, seed=s))
    fp32 = ort_session(fp32_path)
    fp16 = None
    if fp16_path is not None:
        fp16 = reference_session(fp16_path) if fp16_backend == "reference" else ort_session(fp16_path)
    max32, min_cos, max16 = 0.0, 1.0, 0.0
    for i, b in enumerate(batches):
        feeds = feeds_fn(b, 100 + i)
        io.check_feeds(feeds)
        refs = torch_forward(module, io, feeds)
        for name, out32, ref in zip(io.output_names, _outputs(fp32, feeds), refs):
            if out32.shape != ref.shape:
                raise ValueError(f"{io.name}: ONNX output {name!r} shape {out32.shape} != torch {ref.shape} at batch {b}")
            max32 = max(max32, float(np.abs(out32 - ref).max()))
        if fp16 is not None:
            # The reference Sigmoid evaluates both of its branches in float16 and selects one, so
            # exp overflows (inf, inf/inf) in the discarded branch; the selected values are right.
            # Real non-finite outputs are caught below.
            with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
                outs16 = _outputs(fp16, feeds)
            for name, out16, ref in zip(io.output_names, outs16, refs):
                out16 = out16.astype(np.float32)
                if not np.isfinite(out16).all():
                    raise ValueError(f"{io.name}: the FP16 graph's output {name!r} has NaN/Inf at batch {b}; "
                                     "an FP16 overflow -- keep the offending ops in FP32 (diffgap.export.fp16)")
                min_cos = min(min_cos, float(row_cosine(out16, ref).min()))
                max16 = max(max16, float(np.abs(out16 - ref).max()))
    p = Parity(model=io.name, kind=kind, batches=tuple(batches), fp32_max_abs=max32)
    if fp16 is not None:
        p.fp16_min_cos, p.fp16_max_abs = min_cos, max16
        p.fp16_measure = MEASURE_FP16_REF if fp16_backend == "reference" else MEASURE_FP16_ORT
        p.fp16_bound = FP16_MIN_COS_DENOISER if kind == "denoiser" else FP16_MIN_COS_ENCODER
    log.info("parity %s: fp32 max abs %.2e, fp16 min cos %s", io.name, max32, p.fp16_min_cos)
    return p


def format_table(rows: Sequence[Parity]) -> str:
    """The parity table ``diffgap export --check`` prints."""
    head = f"{'model':<24} {'batches':<8} {'fp32 max|d|':>11} {'<=':>2} {'bound':<6} {'fp16 min cos':>12} {'>=':>2} {'bound':<6} {'fp16 measured with':<22} ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        b = ",".join(str(x) for x in r.batches)
        c = f"{r.fp16_min_cos:.7f}" if r.fp16_min_cos is not None else "-"
        cb = f"{r.fp16_bound}" if r.fp16_bound is not None else "-"
        how = {MEASURE_FP16_REF: "onnx.reference fp16", MEASURE_FP16_ORT: "ORT CPU (upcasts)"}.get(r.fp16_measure, "-")
        lines.append(
            f"{r.model:<24} {b:<8} {r.fp32_max_abs:>11.2e} {'':>2} {r.fp32_bound:<6.0e} {c:>12} {'':>2} {cb:<6} {how:<22} "
            f"{'yes' if r.ok else 'NO'}"
        )
    lines.append(
        "fp32: ORT CPU vs PyTorch. fp16 'onnx.reference': numpy float16 arithmetic in every FP16 node; "
        "fp16 'ORT CPU (upcasts)': ORT runs FP16 Gemm/MatMul/Conv as float32, so it measures weight/cast rounding only."
    )
    return "\n".join(lines)


def summarize(rows: Sequence[Parity]) -> dict:
    """JSON-able figures: ``{"ok": bool, "models": {name: {...}}, "bounds": {...}}``."""
    return {
        "ok": all(r.ok for r in rows),
        "models": {r.model: r.to_dict() for r in rows},
        "bounds": {
            "fp32_max_abs": FP32_MAX_ABS,
            "fp16_min_cos_denoiser": FP16_MIN_COS_DENOISER,
            "fp16_min_cos_encoder": FP16_MIN_COS_ENCODER,
        },
        "measures": {"fp32": MEASURE_FP32, "fp16_reference": MEASURE_FP16_REF, "fp16_ort": MEASURE_FP16_ORT},
    }
