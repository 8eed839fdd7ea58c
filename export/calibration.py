"""Inputs a user sends, for FP16 calibration (AutoCast's reference pass) and the parity checks.

AutoCast keeps a node in FP32 when its activations on the reference pass leave FP16's safe range, so
the reference inputs decide which nodes stay FP32. The IOSpec's ``sample_inputs`` (clipped N(0, 1))
are no such inputs: half the guidance scales would be 0, waveforms clipped white noise at full scale,
video frames half black. What each model is calibrated on instead:

* **text encoder**: real captions (:data:`CAPTIONS`, short and long, sound events and music) through
  the export's own tokenizer, so ids, padding and end tokens are laid out as at serving time;
* **audio encoders**: 10 s clips (CLAP, 48 kHz; CAVP at its own rate) of the sound classes the
  captions name -- a pure tone, a harmonic tone with vibrato, a log sweep, noise bursts, amplitude-
  modulated noise (speech-like envelope), near silence -- at RMS loudness from -45 to -12 dBFS
  (quiet room to loud music), through laion-clap's int16 round trip;
* **video encoder**: frames in [0, 1] with smooth colour gradients, a moving textured disc and mild
  sensor noise, mean brightness 0.3-0.7 (not the half-black clipped noise);
* **fused samplers**: conditions are the exported source encoder's embeddings of the inputs above
  (unit-norm vectors of the trained encoder's distribution) when encoders are exported with it;
  with ``--encoders none`` they are unit-norm random directions, the only thing known about a CLAP
  or CAVP embedding without its encoder. Noise is N(0, 1) (what the runtime draws) and the guidance
  scale is the sampler's exported default.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from diffgap.core import audio as daudio
from diffgap.core.iospec import ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, IOSpec

CALIBRATION_BATCH = 8
CAPTIONS = (
    "a dog barks twice in the distance",
    "rain falls steadily on a tin roof",
    "a steady 440 hertz sine tone",
    "people talk in a busy cafe while dishes clatter and music plays softly in the background",
    "a car engine starts and idles",
    "birds chirp in the early morning",
    "loud white noise hiss",
    "a rising sine sweep from low to high pitch",
)
# RMS loudness of the calibration clips, dBFS: quiet room ... loud mastered music.
LOUDNESS_DBFS = (-45.0, -35.0, -28.0, -24.0, -20.0, -16.0, -14.0, -12.0)
_CLIP_KINDS = ("tone", "harmonic", "sweep", "bursts", "speech_like", "noise", "harmonic", "silence")


def captions(batch: int, seed: int = 0) -> list[str]:
    return [CAPTIONS[(seed + i) % len(CAPTIONS)] for i in range(batch)]


def waveform(kind: str, samples: int, sample_rate: int, loudness_dbfs: float, rng: np.random.Generator) -> np.ndarray:
    """One mono clip of ``kind`` (see the module docstring) scaled to ``loudness_dbfs`` RMS, float64."""
    t = np.arange(samples) / sample_rate
    nyq = 0.45 * sample_rate
    f0 = float(rng.uniform(110.0, 880.0))
    if kind == "tone":
        x = np.sin(2 * np.pi * f0 * t)
    elif kind == "harmonic":
        phase = 2 * np.pi * f0 * t + 3.0 * np.sin(2 * np.pi * 5.0 * t)  # 5 Hz vibrato
        x = sum(np.sin(h * phase) / h for h in range(1, 8) if h * f0 < nyq)
    elif kind == "sweep":
        f1, dur = min(8000.0, nyq), samples / sample_rate
        k = np.log(f1 / 60.0) / dur
        x = np.sin(2 * np.pi * 60.0 * (np.exp(k * t) - 1) / k)
    elif kind == "bursts":
        gate = (t % 0.7) < 0.15  # 150 ms bursts every 700 ms, e.g. barks or knocks
        x = rng.standard_normal(samples) * gate
    elif kind == "speech_like":
        env = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2  # ~4 Hz syllable rate
        x = np.convolve(rng.standard_normal(samples), np.ones(8) / 8, mode="same") * env
    elif kind == "noise":
        x = rng.standard_normal(samples)
    elif kind == "silence":
        x = rng.standard_normal(samples)
        loudness_dbfs = -70.0
    else:
        raise ValueError(f"unknown clip kind {kind!r}")
    rms = float(np.sqrt(np.mean(x ** 2))) or 1.0
    return np.clip(x * (10 ** (loudness_dbfs / 20) / rms), -1.0, 1.0)


def clips(batch: int, samples: int, sample_rate: int, seed: int = 0, int16: bool = False) -> np.ndarray:
    """``(batch, samples)`` float32 clips of varied kinds and loudness; ``int16``: laion-clap's round trip."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(batch):
        j = (seed + i) % len(_CLIP_KINDS)
        x = waveform(_CLIP_KINDS[j], samples, sample_rate, LOUDNESS_DBFS[j], rng).astype(np.float32)
        rows.append(daudio.quantize_int16(x) if int16 else x)  # float32 in, as decoded audio reaches laion-clap
    return np.stack(rows)


def frames(batch: int, num_frames: int, size: int, seed: int = 0) -> np.ndarray:
    """``(batch, num_frames, 3, size, size)`` float32 in [0, 1]: gradients, a moving textured disc, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((batch, num_frames, 3, size, size), np.float32)
    for b in range(batch):
        base = rng.uniform(0.3, 0.6, size=3)
        tilt = rng.uniform(-0.12, 0.12, size=(3, 2))
        texture = 0.08 * np.sin(2 * np.pi * rng.uniform(3, 12) * (xx + yy))
        for f in range(num_frames):
            cx, cy = 0.2 + 0.6 * f / max(num_frames - 1, 1), 0.5 + 0.2 * np.sin(f / 3 + b)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < 0.04
            for c in range(3):
                img = base[c] + tilt[c, 0] * xx + tilt[c, 1] * yy + disc * (0.3 + texture)
                out[b, f, c] = img + 0.02 * rng.standard_normal((size, size))
    return np.clip(out, 0.0, 1.0)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def sampler_feeds(io: IOSpec, batch: int, seed: int = 0,
                  conditions: Callable[[int, int], np.ndarray] | None = None,
                  guidance: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """A fused sampler's feeds: ``conditions(batch, seed)`` (source-encoder embeddings) or unit-norm
    random directions, N(0, 1) noise, and the exported default guidance scale (``guidance``: per-row
    scales cycled over the rows instead, as the parity checks use to cover the guided path)."""
    rng = np.random.default_rng(seed)
    cond, noise = io.role(ROLE_CONDITION), io.role(ROLE_NOISE)
    c = conditions(batch, seed) if conditions is not None else rng.standard_normal(cond.concrete(batch))
    feeds = {cond.name: unit_rows(np.asarray(c, np.float64)),
             noise.name: rng.standard_normal(noise.concrete(batch)).astype(noise.np_dtype)}
    if io.has_role(ROLE_GUIDANCE):
        g = io.role(ROLE_GUIDANCE)
        scales = [g.default] if guidance is None else list(guidance)
        feeds[g.name] = np.array([[scales[i % len(scales)]] for i in range(batch)], g.np_dtype)
    return feeds


def single_input(io: IOSpec, x: np.ndarray) -> Mapping[str, np.ndarray]:
    """``{name: x}`` for a model that declares exactly one input (an audio or video tower)."""
    if len(io.inputs) != 1:
        raise ValueError(f"{io.name}: expected one input, the IOSpec declares {io.input_names}")
    return {io.inputs[0].name: x.astype(io.inputs[0].np_dtype, copy=False)}
