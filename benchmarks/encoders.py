"""CLAP text and audio encoders at B in {1, 8}: ORT CPU FP32 and the FP16 graph (upcast path).

Feeds are the encoders' own declared sample inputs (token ids / 10 s 48 kHz waveforms), so the rows
time exactly what the I/O declaration says the model takes. TensorRT rows only with a GPU.
"""
from __future__ import annotations

from .context import Context
from .harness import Row, run_row, tensorrt_unavailable_reason

ENCODERS = ("clap_text_encoder", "clap_audio_encoder")


def _factory(ctx: Context, name: str, batch: int, backend: str, precision: str, **opts):
    def factory():
        from diffgap.runtime.session import open_model

        sess = open_model(ctx.main_export, name, backend, precision, **opts)
        feeds = sess.io.sample_inputs(batch, seed=0, include_optional=False)
        return lambda: sess.infer(feeds)

    return factory


def run(ctx: Context) -> list[Row]:
    from diffgap.core.manifest import Manifest

    man = Manifest.load(ctx.main_export)
    trt_reason = tensorrt_unavailable_reason()
    rows: list[Row] = []
    for name in ENCODERS:
        if name not in man.models:
            rows.append(Row("encoders", name, "ort-cpu", "fp32", 0, status="skipped",
                            reason=f"export {ctx.main_export} has no {name}"))
            continue
        for batch in ctx.encoder_batches:
            r = Row("encoders", name, "ort-cpu", "fp32", batch)
            rows.append(run_row(r, _factory(ctx, name, batch, "ort-cpu", "fp32", intra_op_threads=ctx.threads), ctx.policy))
            r = Row("encoders", name, "ort-cpu", "fp16-graph", batch,
                    extra={"note": "ORT CPU upcasts FP16 graphs to float32 kernels (FP16.md)"})
            rows.append(run_row(r, _factory(ctx, name, batch, "ort-cpu", "fp16", intra_op_threads=ctx.threads), ctx.policy))
            r = Row("encoders", name, "tensorrt", "fp16", batch)
            if trt_reason:
                r.status, r.reason = "skipped", trt_reason
                rows.append(r)
            else:
                def trt(name=name, batch=batch):
                    from diffgap.runtime.engine import build_engines

                    build_engines(ctx.main_export, models=[name], precisions=("fp16",))
                    return _factory(ctx, name, batch, "tensorrt", "fp16")()

                rows.append(run_row(r, trt, ctx.policy))
    return rows
