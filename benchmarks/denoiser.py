"""The fused K-step sampler at K x B on every backend, each row against the roofline.

Backends (one row each per K, B):

* ``torch-eager``   -- ``DiffGAP.bridge``: the PyTorch step loop, one python-level call per layer.
* ``torch-compile`` -- the same loop with the denoiser network through ``torch.compile`` (inductor,
  CPU; see :func:`_compiled_model` for why the network and not the whole loop); the first call's time
  (compiling for a new batch size) is recorded; a failure is recorded with its reason.
* ``ort-cpu`` fp32  -- the fused ONNX graph through ``diffgap.runtime.open_model`` (feed checks included).
* ``ort-cpu`` fp16  -- the FP16 graph on ORT's CPU provider. ORT CPU has no FP16 GEMM: it inserts casts
  and runs float32 kernels (its profiler shows float32 Gemm/MatMul after the casts), so this row measures ORT CPU's upcast path, not FP16
  arithmetic.
* ``tensorrt`` fp16 (and ``+cuda-graph``) -- only where a GPU with TensorRT + pycuda is present; else
  one recorded ``skipped`` row per (K, B) saying why.

Like for like: the fused graph's matrix-product FLOPs are compared with the eager loop's (torch's
``FlopCounterMode``); if the graph always evaluates the unconditional branch (guidance as a graph
input), the eager loop is given a tensor guidance scale so both do the same work.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from .context import Context
from .harness import Row, run_row, tensorrt_unavailable_reason
from .roofline import bound, measure_bandwidth_gbs, onnx_graph_cost

log = logging.getLogger("benchmarks.denoiser")


# ---- torch -----------------------------------------------------------------------------------
def _torch_inputs(ctx: Context, batch: int, seed: int = 0):
    import torch

    cfg = ctx.model.config
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, cfg.embed_dim, generator=g)   # (B, E)
    noise = torch.randn(batch, cfg.heads.dim, generator=g)  # (B, D)
    return cond, noise


def _guidance_arg(ctx: Context, batch: int, tensor_guidance: bool):
    import torch

    g = float(ctx.model.config.diffusion.guidance_scale)
    return torch.full((batch, 1), g) if tensor_guidance else None


def eager_flops(ctx: Context, steps: int, batch: int, tensor_guidance: bool) -> float:
    """Matrix-product FLOPs of one eager ``bridge`` call (torch's flop counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cond, noise = _torch_inputs(ctx, batch)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        ctx.model.bridge(ctx.direction, cond, noise, steps=steps, guidance_scale=_guidance_arg(ctx, batch, tensor_guidance))
    return float(fc.get_total_flops())


def _compiled_model(ctx: Context):
    """A view of ``ctx.model`` whose timed denoiser is ``torch.compile``d (parameters shared).

    The network is compiled, not the unrolled K-step loop: inductor on the whole loop took minutes
    per (K, B) on a 2-core machine, and compiling the network is how diffusion models are compiled
    in practice. The K-step loop and the DDIM arithmetic stay eager python around it; one compiled
    graph per (batch, conditional/unconditional) serves every K.
    """
    import copy

    import torch

    if ctx.compiled_model is not None:
        return ctx.compiled_model
    view = copy.copy(ctx.model)
    view._modules = dict(ctx.model._modules)
    den = torch.nn.ModuleDict(dict(ctx.model.denoisers.items()))
    den[ctx.direction] = torch.compile(ctx.model.denoisers[ctx.direction], dynamic=False)
    view._modules["denoisers"] = den
    ctx.compiled_model = view
    return view


def eager_factory(ctx: Context, steps: int, batch: int, tensor_guidance: bool, threads: int | None = None) -> Callable[[], Callable[[], Any]]:
    def factory():
        import torch

        torch.set_num_threads(threads or ctx.threads)
        cond, noise = _torch_inputs(ctx, batch)
        g = _guidance_arg(ctx, batch, tensor_guidance)

        def fn():
            with torch.inference_mode():
                return ctx.model.bridge(ctx.direction, cond, noise, steps=steps, guidance_scale=g)

        return fn

    return factory


def _compile_factory(ctx: Context, steps: int, batch: int, tensor_guidance: bool, row: Row) -> Callable[[], Callable[[], Any]]:
    def factory():
        import torch

        torch.set_num_threads(ctx.threads)
        cond, noise = _torch_inputs(ctx, batch)
        g = _guidance_arg(ctx, batch, tensor_guidance)
        model = _compiled_model(ctx)
        t0 = time.perf_counter()
        # no_grad, not inference_mode: dynamo guards on tensors created inside inference_mode fail
        # to match on the next call in torch 2.14 ("dispatch key set mismatch").
        with torch.no_grad():
            model.bridge(ctx.direction, cond, noise, steps=steps, guidance_scale=g)
        row.extra["first_call_s"] = round(time.perf_counter() - t0, 2)  # includes compiling a new batch size
        row.extra["note"] = "torch.compile of the denoiser network; step loop + DDIM update eager"

        def fn():
            with torch.no_grad():
                return model.bridge(ctx.direction, cond, noise, steps=steps, guidance_scale=g)

        return fn

    return factory


# ---- onnxruntime / TensorRT -----------------------------------------------------------------
def sampler_feeds(io, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Required inputs from the IOSpec's sample; optional ones left to their declared default."""
    return io.sample_inputs(batch, seed=seed, include_optional=False)


def _runtime_factory(ctx: Context, steps: int, batch: int, backend: str, precision: str, **opts) -> Callable[[], Callable[[], Any]]:
    def factory():
        from diffgap.runtime.session import open_model

        sess = open_model(ctx.exports[steps], ctx.sampler_name, backend, precision, **opts)
        feeds = sampler_feeds(sess.io, batch)
        return lambda: sess.infer(feeds)

    return factory


def _ensure_engines(ctx: Context, steps: int) -> None:
    from diffgap.runtime.engine import build_engines

    build_engines(ctx.exports[steps], models=[ctx.sampler_name], precisions=("fp16",))


# ---- the group ---------------------------------------------------------------------------------
def _cost_rows(ctx: Context, steps: int, batch: int) -> dict[str, Any]:
    from diffgap.core.manifest import Manifest

    man = Manifest.load(ctx.exports[steps])
    cost = onnx_graph_cost(str(man.path(ctx.sampler_name, "fp32")), batch)
    cost.update(bound(cost["flops"], cost["bytes"], ctx.roofline["peak_gflops"], ctx.roofline["bandwidth_gbs"]))
    cache_bw = ctx.roofline.get("cache_bandwidth_gbs")
    if cache_bw:
        cb = bound(cost["flops"], cost["bytes"], ctx.roofline["peak_gflops"], cache_bw)
        cost["bound_cache_ms"] = cb["bound_ms"]
        cost["bound_cache_by"] = cb["bound_by"]
    return cost


def _attach_roofline(row: Row, cost: dict[str, Any]) -> None:
    keep = ("flops", "bytes", "weight_bytes_streamed", "distinct_weight_bytes", "bound_ms", "bound_by",
            "intensity_flops_per_byte", "bound_cache_ms", "bound_cache_by")
    row.extra.update({k: cost[k] for k in keep if k in cost})
    if row.ok and row.backend.startswith(("torch", "ort")):  # the roofline is this CPU's
        row.extra["roofline_fraction"] = cost["bound_ms"] / row.stats.median_ms
        if "bound_cache_ms" in cost:
            row.extra["roofline_fraction_cache"] = cost["bound_cache_ms"] / row.stats.median_ms
        row.extra["achieved_gflops"] = cost["flops"] / (row.stats.median_ms * 1e6)


def measure_cache_bandwidth(ctx: Context) -> None:
    """Triad bandwidth at the sampler's weight working set (it fits in LLC on most CPUs)."""
    from diffgap.core.manifest import Manifest

    k = min(ctx.exports)
    cost = onnx_graph_cost(str(Manifest.load(ctx.exports[k]).path(ctx.sampler_name, "fp32")), 1)
    ws = int(cost["distinct_weight_bytes"])
    # triad touches 3 arrays: size each so the three together match the weights' footprint
    bw = measure_bandwidth_gbs(max(ws // 3, 1 << 16), repeats=3 if ctx.quick else 20, threads=ctx.threads)
    ctx.roofline["cache_bandwidth_gbs"] = max(bw["copy_gbs"], bw["triad_gbs"])
    ctx.roofline["cache_bandwidth_working_set_mb"] = ws / 1e6
    log.info("bandwidth at the sampler's %.1f MB weight working set: %.1f GB/s", ws / 1e6, ctx.roofline["cache_bandwidth_gbs"])


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    if not ctx.exports:
        raise RuntimeError("no sampler exports to time")
    measure_cache_bandwidth(ctx)
    trt_reason = tensorrt_unavailable_reason()
    for steps in ctx.steps:
        # Does the fused graph evaluate the unconditional branch too? Match the eager loop to it.
        graph_flops = onnx_graph_cost(str(_manifest(ctx, steps).path(ctx.sampler_name, "fp32")), 1)["flops"]
        f_plain = eager_flops(ctx, steps, 1, tensor_guidance=False)
        f_guided = eager_flops(ctx, steps, 1, tensor_guidance=True)
        tensor_guidance = abs(f_guided - graph_flops) < abs(f_plain - graph_flops)
        ctx.tensor_guidance[steps] = tensor_guidance
        eager_match = (f_guided if tensor_guidance else f_plain) / graph_flops if graph_flops else float("nan")
        note = ("the fused graph evaluates the conditional and unconditional branches every step (guidance_scale is a "
                "graph input), as one stacked (2B, .) pass whose unconditional adaLN modulations are graph constants; the "
                "eager/compile rows pass a tensor guidance scale to do the same work (eager also computes those "
                "modulations each step: 'eager_vs_graph_flops' in the JSON)")
        if tensor_guidance and note not in ctx.notes:
            ctx.notes.append(note)
        for batch in ctx.batches:
            cost = _cost_rows(ctx, steps, batch)
            specs: list[tuple[Row, Callable[[], Callable[[], Any]] | None]] = []
            r = Row("denoiser", ctx.sampler_name, "torch-eager", "fp32", batch, steps)
            r.extra["eager_vs_graph_flops"] = eager_match
            specs.append((r, eager_factory(ctx, steps, batch, tensor_guidance)))
            r = Row("denoiser", ctx.sampler_name, "torch-compile", "fp32", batch, steps)
            specs.append((r, _compile_factory(ctx, steps, batch, tensor_guidance, r)))
            specs.append((Row("denoiser", ctx.sampler_name, "ort-cpu", "fp32", batch, steps),
                          _runtime_factory(ctx, steps, batch, "ort-cpu", "fp32", intra_op_threads=ctx.threads)))
            r = Row("denoiser", ctx.sampler_name, "ort-cpu", "fp16-graph", batch, steps)
            r.extra["note"] = "ORT CPU upcasts: float32 kernels after casts (FP16.md); not FP16 arithmetic"
            if "fp16" in _manifest(ctx, steps).model(ctx.sampler_name).files:
                specs.append((r, _runtime_factory(ctx, steps, batch, "ort-cpu", "fp16", intra_op_threads=ctx.threads)))
            else:
                r.status = "skipped"
                r.reason = (f"no FP16 graph at K={steps}: ModelOpt AutoCast on the unrolled graph exceeds this machine's "
                            "memory/time (OOM-killed at >12 GB); see benchmarks/prepare.py FP16_MAX_STEPS")
                specs.append((r, None))
            for cuda_graph in (False, True):
                backend = "tensorrt+cuda-graph" if cuda_graph else "tensorrt"
                r = Row("denoiser", ctx.sampler_name, backend, "fp16", batch, steps)
                if trt_reason:
                    r.status, r.reason = "skipped", trt_reason
                    specs.append((r, None))
                else:
                    def trt_factory(steps=steps, batch=batch, cuda_graph=cuda_graph):
                        _ensure_engines(ctx, steps)
                        return _runtime_factory(ctx, steps, batch, "tensorrt", "fp16", cuda_graph=cuda_graph)()

                    specs.append((r, trt_factory))
            for row, factory in specs:
                if factory is not None:
                    run_row(row, factory, ctx.policy)
                _attach_roofline(row, cost)
                rows.append(row)
    return rows


def _manifest(ctx: Context, steps: int):
    from diffgap.core.manifest import Manifest

    return Manifest.load(ctx.exports[steps])
