"""The end-to-end in-process Pipeline: raw input -> CLAP encoder -> fused sampler -> bridged embedding.

``TextToAudioBridge`` takes captions (tokenizer included in the time); ``AudioToTextBridge`` takes
prepared 10 s waveforms (decoding files is I/O, not model time). Its B=1 text row is the reference
for the Triton ensemble overhead goal.
"""
from __future__ import annotations

import numpy as np

from .context import Context
from .harness import Row, run_row

CAPTIONS = (
    "a dog barks twice in the distance",
    "rain falls on a tin roof",
    "a man speaks over a crowd",
    "birds chirp while a car passes by",
    "an engine idles then revs up",
    "water runs from a tap into a sink",
    "a baby laughs and claps",
    "church bells ring in a city street",
)


def captions(batch: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]


def _text_factory(ctx: Context, batch: int):
    def factory():
        from diffgap.runtime.pipeline import TextToAudioBridge

        bridge = TextToAudioBridge(ctx.main_export, "ort-cpu", "fp32", intra_op_threads=ctx.threads)
        texts = captions(batch)
        return lambda: bridge(texts)

    return factory


def _audio_factory(ctx: Context, batch: int):
    def factory():
        from diffgap.runtime.pipeline import AudioToTextBridge

        bridge = AudioToTextBridge(ctx.main_export, "ort-cpu", "fp32", intra_op_threads=ctx.threads)
        spec = bridge.encoder.io.inputs[0]
        # a 440 Hz tone with a little noise: real-valued audio in CLAP's [-1, 1] range
        n = spec.feature_shape[0]
        t = np.arange(n, dtype=np.float32) / 48000.0
        rng = np.random.default_rng(0)
        wav = (0.3 * np.sin(2 * np.pi * 440.0 * t)[None] + 0.01 * rng.standard_normal((batch, n))).astype(np.float32)
        return lambda: bridge(wav)

    return factory


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for batch in ctx.pipeline_batches:
        r = Row("pipeline", "TextToAudioBridge", "ort-cpu", "fp32", batch, ctx.main_steps,
                extra={"input": "captions (tokenizer included)"})
        rows.append(run_row(r, _text_factory(ctx, batch), ctx.policy))
    for batch in ctx.pipeline_batches:
        r = Row("pipeline", "AudioToTextBridge", "ort-cpu", "fp32", batch, ctx.main_steps,
                extra={"input": "prepared 10 s 48 kHz waveforms"})
        rows.append(run_row(r, _audio_factory(ctx, batch), ctx.policy))
    return rows
