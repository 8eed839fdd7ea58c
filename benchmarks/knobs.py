"""What was tried on the fused sampler to close a missed goal: ORT settings, one at a time.

At the goal rows (K = 25; B = 1 for the speed-up goal, B = 64 for the roofline goal), each variant is
a plain ``onnxruntime.InferenceSession`` on the FP32 graph (the runtime wrapper's feed checks are
itself one of the variants):

* ``runtime-wrapper``        -- ``diffgap.runtime`` session (``infer``: IOSpec checks + ``run``), the baseline rows
* ``raw-run``                -- ``InferenceSession.run`` directly (what the checks cost)
* ``io-binding``             -- inputs bound once as OrtValues, output preallocated (no per-call copies)
* ``threads=N``              -- intra-op threads 1 .. cores
* ``opt=disable|basic|extended|all`` -- graph optimisation level
* ``no-spin``                -- intra-op thread spinning off (``session.intra_op.allow_spinning=0``)

and, for a fair speed-up figure, the eager PyTorch loop with each thread count too (torch's
per-op fork/join costs more than it saves on small matrices).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .context import Context
from .denoiser import eager_factory, sampler_feeds
from .harness import Row, run_row


def _full_feeds(io, batch: int) -> dict[str, np.ndarray]:
    feeds = sampler_feeds(io, batch)
    for t in io.inputs:
        if t.name not in feeds:
            feeds[t.name] = np.full(t.concrete(batch), t.default, dtype=t.np_dtype)
    return feeds


def _session(path: str, threads: int | None, opt: str = "all", spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt]
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def _raw(path: str, io, batch: int, **kw) -> Callable[[], Callable[[], Any]]:
    def factory():
        sess = _session(path, **kw)
        feeds = _full_feeds(io, batch)
        names = io.output_names
        return lambda: sess.run(names, feeds)

    return factory


def _iobinding(path: str, io, batch: int, threads: int) -> Callable[[], Callable[[], Any]]:
    def factory():
        import onnxruntime as ort

        sess = _session(path, threads)
        binding = sess.io_binding()
        # OrtValue.ortvalue_from_numpy borrows the array's memory: the arrays must outlive the binding
        # (a temporary here would let ORT write into freed memory).
        arrays = dict(_full_feeds(io, batch))
        arrays.update({t.name: np.empty(t.concrete(batch), t.np_dtype) for t in io.outputs})
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
        for t in io.inputs:
            binding.bind_ortvalue_input(t.name, values[t.name])
        for t in io.outputs:
            binding.bind_ortvalue_output(t.name, values[t.name])

        def fn(sess=sess, binding=binding, keep=(arrays, values)):
            sess.run_with_iobinding(binding)

        return fn

    return factory


def run(ctx: Context, steps: int, batches: tuple[int, ...]) -> list[Row]:
    from diffgap.core.manifest import Manifest
    from diffgap.runtime.session import open_model

    man = Manifest.load(ctx.exports[steps])
    io = man.model(ctx.sampler_name).io
    path = str(man.path(ctx.sampler_name, "fp32"))
    rows: list[Row] = []
    for batch in batches:
        def wrapper(batch=batch):
            sess = open_model(man, ctx.sampler_name, "ort-cpu", "fp32", intra_op_threads=ctx.threads)
            feeds = sampler_feeds(io, batch)
            return lambda: sess.infer(feeds)

        variants: list[tuple[str, Callable[[], Callable[[], Any]]]] = [
            ("runtime-wrapper", wrapper),
            ("raw-run", _raw(path, io, batch, threads=ctx.threads)),
            ("io-binding", _iobinding(path, io, batch, ctx.threads)),
            ("no-spin", _raw(path, io, batch, threads=ctx.threads, spin=False)),
        ]
        variants += [(f"threads={n}", _raw(path, io, batch, threads=n)) for n in range(1, ctx.threads + 1) if n != ctx.threads]
        variants += [(f"opt={o}", _raw(path, io, batch, threads=ctx.threads, opt=o)) for o in ("disable", "basic", "extended")]
        for label, factory in variants:
            r = Row("knobs", ctx.sampler_name, "ort-cpu", "fp32", batch, steps, extra={"variant": label})
            rows.append(run_row(r, factory, ctx.policy))
        if ctx.model is not None:
            tg = ctx.tensor_guidance.get(steps, True)
            for n in range(1, ctx.threads + 1):
                r = Row("knobs", ctx.sampler_name, "torch-eager", "fp32", batch, steps, extra={"variant": f"eager threads={n}"})
                rows.append(run_row(r, eager_factory(ctx, steps, batch, tg, threads=n), ctx.policy))
    return rows
