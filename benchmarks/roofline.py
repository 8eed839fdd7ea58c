"""This machine's roofline (sgemm peak, memory bandwidth) and the cost of a fused ONNX graph.

Peak: the best of several timed fp32 matrix multiplies at n=2048 through torch (MKL/oneDNN, all
``threads``) and numpy (its BLAS); the higher figure is the attainable peak. Bandwidth: STREAM-style
copy (2 x 4 bytes per element) and triad ``a = b + s*c`` (3 x 4 bytes per element, STREAM's
convention: write-allocate traffic not counted) on arrays far larger than the last-level cache, best of
several repeats. A cache-resident triad at a chosen working-set size is measured too (what a model whose
weights fit in L3 can get).

Graph cost (:func:`onnx_graph_cost`): every MatMul/Gemm of the graph, shapes from ONNX shape
inference at a concrete batch; ``flops = 2*M*K*N`` per product; ``bytes = weight bytes + activation
in/out bytes`` per product. In the fused sampler the K unrolled steps reference the same weight
initializers, so counting them per node counts the weights once per step: the traffic when the weights
are re-read every step (no reuse across steps), which is the small-batch case. Elementwise ops are not
counted: the MLP's FLOPs and weight traffic are in its matrix products.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.roofline")


def _best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peak_gflops(n: int = 2048, repeats: int = 10, threads: int | None = None) -> dict[str, Any]:
    """fp32 matmul peak in GFLOP/s: torch and numpy at n x n, best of ``repeats``."""
    flops = 2.0 * n**3
    out: dict[str, Any] = {"n": n, "repeats": repeats}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    out["numpy_gflops"] = flops / _best_seconds(lambda: a @ b, repeats) / 1e9
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from diffgap.machine import torch_matmul_gflops

        out["torch_gflops"] = torch_matmul_gflops(n, repeats, a, b)
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


def measure_bandwidth_gbs(nbytes_per_array: int, repeats: int = 10, threads: int | None = None) -> dict[str, Any]:
    """Copy and triad bandwidth (GB/s, 1e9 bytes) with arrays of ``nbytes_per_array`` each.

    Both torch (its elementwise kernels use all ``threads``) and numpy (one thread) are timed and the
    best figure kept: on small, cache-resident arrays torch's thread fork/join costs more than the copy.
    """
    n = max(1024, nbytes_per_array // 4)
    res: dict[str, Any] = {"array_mb": n * 4 / 1e6}
    a, b, c = (np.full(n, i + 1, dtype=np.float32) for i in range(3))

    def np_triad():
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)

    t_copy = {"numpy (1 thread)": _best_seconds(lambda: np.copyto(a, b), repeats)}
    # numpy's triad is two passes (a = 3c; a += b): 5 array transfers, counted as such
    t_triad = {"numpy (1 thread)": _best_seconds(np_triad, repeats) * 3 / 5}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        ta, tb, tc = (torch.from_numpy(x) for x in (a, b, c))
        with torch.inference_mode():
            name = f"torch ({torch.get_num_threads()} threads)"
            t_copy[name] = _best_seconds(lambda: ta.copy_(tb), repeats)
            t_triad[name] = _best_seconds(lambda: torch.add(tb, tc, alpha=3.0, out=ta), repeats)
    except ImportError:
        pass
    best_copy = min(t_copy, key=t_copy.get)
    best_triad = min(t_triad, key=t_triad.get)
    res.update(
        copy_gbs=2 * 4 * n / t_copy[best_copy] / 1e9,
        triad_gbs=3 * 4 * n / t_triad[best_triad] / 1e9,
        impl=f"copy: {best_copy}, triad: {best_triad}",
    )
    return res


def measure_machine(threads: int, quick: bool = False) -> dict[str, Any]:
    """The roofline of this machine: peak GFLOP/s and DRAM bandwidth (the two numbers of the bound)."""
    peak = measure_peak_gflops(n=1024 if quick else 2048, repeats=3 if quick else 10, threads=threads)
    # 256 MB per array (768 MB for the triad) is far past any last-level cache of a CPU host (the 2-core
    # x86-64 VM of benchmarks/results records a 32 MiB L3 under machine.caches).
    dram = measure_bandwidth_gbs((32 if quick else 256) * 2**20, repeats=3 if quick else 8, threads=threads)
    bw = max(dram["copy_gbs"], dram["triad_gbs"])
    rec = {"peak": peak, "dram": dram, "peak_gflops": peak["peak_gflops"], "bandwidth_gbs": bw,
           "ridge_flops_per_byte": peak["peak_gflops"] / bw}
    log.info(
        "roofline: peak %.1f GFLOP/s (torch %.1f, numpy %.1f), DRAM bandwidth %.1f GB/s (copy %.1f, triad %.1f), "
        "ridge %.1f FLOP/byte",
        rec["peak_gflops"], peak.get("torch_gflops", float("nan")), peak["numpy_gflops"], bw,
        dram["copy_gbs"], dram["triad_gbs"], rec["ridge_flops_per_byte"],
    )
    return rec


# ---- the cost of a graph -----------------------------------------------------------------------
_ELEM_BYTES = {1: 4, 10: 2, 11: 8, 6: 4, 7: 8, 16: 2}  # onnx TensorProto: FLOAT, FLOAT16, DOUBLE, INT32, INT64, BF16


def onnx_graph_cost(onnx_path: str, batch: int) -> dict[str, Any]:
    """FLOPs and bytes moved by the matrix products of ``onnx_path`` at ``batch`` (module docstring)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    for inp in graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph

    shapes: dict[str, tuple[list[int], int]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = ([d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim], tt.elem_type)
    for init in g.initializer:
        shapes[init.name] = (list(init.dims), init.data_type)
    # Constant nodes holding weights (some exporters emit weights as Constant nodes)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = (list(a.t.dims), a.t.data_type)
    weight_names = set(init_names) | {n.output[0] for n in g.node if n.op_type == "Constant"}
    # A weight reached through a Cast (FP16 graphs keep I/O FP32 and cast weights) is still a weight.
    for node in g.node:
        if node.op_type in ("Cast", "Transpose", "Identity") and node.input and node.input[0] in weight_names:
            weight_names.add(node.output[0])

    flops = 0.0
    weight_bytes = 0.0
    act_bytes = 0.0
    products = 0
    unknown = 0
    distinct_weights: dict[str, float] = {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if len(node.input) < 2 or node.input[0] not in shapes or node.input[1] not in shapes or node.output[0] not in shapes:
            unknown += 1
            continue
        (sa, ta), (sb, tb) = shapes[node.input[0]], shapes[node.input[1]]
        so, to = shapes[node.output[0]]
        if -1 in sa or -1 in sb or -1 in so or len(sa) < 2 or len(sb) < 1:
            unknown += 1
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            m, k = (sa[1], sa[0]) if attrs.get("transA", 0) else (sa[0], sa[1])
            n = sb[0] if attrs.get("transB", 0) else sb[1]
            lead = 1
        else:
            k = sa[-1]
            n = sb[-1] if len(sb) >= 2 else 1
            m = sa[-2]
            lead = int(np.prod(so[:-2])) if len(so) > 2 else 1
        flops += 2.0 * lead * m * k * n
        products += 1
        for name, shp, et in ((node.input[0], sa, ta), (node.input[1], sb, tb)):
            nb = float(np.prod(shp)) * _ELEM_BYTES.get(et, 4)
            if name in weight_names:
                weight_bytes += nb
                distinct_weights[name] = nb
            else:
                act_bytes += nb
        act_bytes += float(np.prod(so)) * _ELEM_BYTES.get(to, 4)
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in shapes:
            sc, tc = shapes[node.input[2]]
            if -1 not in sc:
                weight_bytes += float(np.prod(sc)) * _ELEM_BYTES.get(tc, 4)
    return {
        "batch": batch,
        "flops": flops,
        "bytes": weight_bytes + act_bytes,
        "weight_bytes_streamed": weight_bytes,
        "activation_bytes": act_bytes,
        "distinct_weight_bytes": float(sum(distinct_weights.values())),
        "matrix_products": products,
        "products_without_shapes": unknown,
    }


def bound(flops: float, nbytes: float, peak_gflops: float, bandwidth_gbs: float) -> dict[str, Any]:
    """Roofline time bound max(bytes / bandwidth, flops / peak) in ms, and which side binds."""
    t_mem = nbytes / (bandwidth_gbs * 1e9)
    t_cmp = flops / (peak_gflops * 1e9)
    return {
        "bound_ms": max(t_mem, t_cmp) * 1e3,
        "memory_ms": t_mem * 1e3,
        "compute_ms": t_cmp * 1e3,
        "bound_by": "memory" if t_mem >= t_cmp else "compute",
        "intensity_flops_per_byte": flops / nbytes if nbytes else float("inf"),
    }
