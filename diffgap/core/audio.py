"""laion-clap's audio data path for non-fusion CLAP models, torch-free (numpy + soxr + soundfile).

The runtime and ``diffgap embed`` both call this, so an exported audio encoder sees exactly the
waveforms laion-clap's own ``CLAP_Module.get_audio_embedding_from_filelist`` would feed it:

1. decode (soundfile) -> float32 ``(T, C)``;
2. mono: mean over channels (what ``librosa.load(mono=True)`` does);
3. resample to 48 kHz with soxr "HQ" (``librosa.load(sr=48000)``'s default ``res_type="soxr_hq"``),
   length fixed to ``ceil(T * 48000 / sr)`` as librosa does;
4. int16 quantisation round trip: ``clip(x, -1, 1) * 32767 -> int16 (truncating) -> / 32767``
   (laion-clap ``training/data.py: float32_to_int16 / int16_to_float32``);
5. fit to 10 s = 480 000 samples (``get_audio_features(..., data_filling="repeatpad")``):
   shorter clips are tiled ``int(480000 / T)`` whole times, then zero-padded to 480 000.

Longer clips: laion-clap crops a *random* 10 s window at inference (``data_truncating="rand_trunc"``),
which makes embeddings irreproducible. diffgap's documented deterministic policy (``long_clip``):

* ``"center"`` (default): the centred 10 s window, offset ``(T - 480000) // 2``; one forward pass,
  the same thing the runtime's single-input graph computes.
* ``"start"``: the first 10 s.
* ``"chunks"``: consecutive 10 s windows starting at 0, 480 000, ... with the last one aligned to the
  clip's end (laion-clap ``CLAP.audio_infer``'s tiling); the encoder averages the chunks'
  L2-normalised embeddings and re-normalises.

Decoding errors are :class:`AudioError` (a ``UserError``, so a ``ValueError``) with a ``kind`` from :data:`AUDIO_ERRORS`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UserError

SAMPLE_RATE = 48000      # laion-clap audio_cfg.sample_rate
CLIP_SAMPLES = 480000    # laion-clap audio_cfg.clip_samples (10 s at 48 kHz)
LONG_CLIP_POLICIES = ("center", "start", "chunks")
# File suffixes a folder scan treats as audio: the containers libsndfile (soundfile) decodes.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf")

# The listed decoding errors: kind -> what it means (and the fix, in the raised message).
AUDIO_ERRORS: dict[str, str] = {
    "missing": "the file does not exist",
    "empty-file": "the file has zero bytes",
    "not-audio": "the file is not in an audio format soundfile can read (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...)",
    "corrupt": "the file looks like audio (known header) but cannot be decoded",
    "no-samples": "the file decodes to zero samples",
    "non-finite": "the decoded signal contains NaN or Inf",
}

# Leading bytes of the containers libsndfile reads; used to tell "corrupt audio" from "not audio".
_AUDIO_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b"caff", b".snd", b"wvpk", b"\xff\xfb",
                b"\xff\xf3", b"\xff\xf2", b"\xff\xfa")


class AudioError(UserError):
    """A file that cannot become a CLAP input; ``kind`` is one of :data:`AUDIO_ERRORS`. A file the user
    named, so a :class:`~diffgap.core.errors.UserError` (and so a ``ValueError``)."""

    def __init__(self, kind: str, path: str | os.PathLike, detail: str = "") -> None:
        if kind not in AUDIO_ERRORS:
            raise ValueError(f"unknown audio error kind {kind!r}")
        self.kind = kind
        self.path = str(path)
        msg = f"{path}: {kind}: {AUDIO_ERRORS[kind]}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode an audio file. Returns ``(x, sr)`` with ``x: (T, C)`` float32 in [-1, 1]."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError("missing", path)
    if path.stat().st_size == 0:
        raise AudioError("empty-file", path)
    with open(path, "rb") as f:
        head = f.read(12)
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError on bad input
        looks_audio = head.startswith(_AUDIO_MAGIC) or head[4:8] == b"ftyp"
        raise AudioError("corrupt" if looks_audio else "not-audio", path, f"{type(e).__name__}: {e}") from None
    if x.shape[0] == 0:
        raise AudioError("no-samples", path)
    if not np.isfinite(x).all():
        raise AudioError("non-finite", path)
    return x, int(sr)


def to_mono(x: np.ndarray) -> np.ndarray:
    """``(T,)`` or ``(T, C)`` -> ``(T,)`` float32: mean over channels (librosa.to_mono)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"audio must be (T,) or (T, channels), got shape {x.shape}")
    return x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]


def resample(x: np.ndarray, sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """``x: (T,)`` at ``sr`` -> ``(T',)`` at ``target_sr`` with soxr HQ (librosa's soxr_hq)."""
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if sr == target_sr:
        return np.asarray(x, dtype=np.float32)
    import soxr

    y = soxr.resample(np.asarray(x, dtype=np.float32), sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    # librosa.resample(fix=True) then trims/zero-pads to ceil(T * target_sr / sr) samples.
    n = int(np.ceil(len(x) * (float(target_sr) / sr)))  # same float expression as librosa
    return y[:n] if len(y) >= n else np.pad(y, (0, n - len(y)))


def quantize_int16(x: np.ndarray) -> np.ndarray:
    """laion-clap's int16 round trip: ``int16_to_float32(float32_to_int16(x))``."""
    q = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


def repeat_pad(x: np.ndarray, clip_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """laion-clap ``repeatpad`` for ``len(x) <= clip_samples``: tile whole copies, then zero-pad."""
    n = len(x)
    if n == 0:
        raise ValueError("cannot pad an empty waveform; check the file decodes to samples")
    if n > clip_samples:
        raise ValueError(f"repeat_pad needs at most {clip_samples} samples, got {n}; use fit_clips")
    if n == clip_samples:
        return x
    tiled = np.tile(x, int(clip_samples / n))
    return np.pad(tiled, (0, clip_samples - len(tiled))).astype(np.float32, copy=False)


def fit_clips(x: np.ndarray, long_clip: str = "center", clip_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """``x: (T,)`` -> ``(n, clip_samples)``: repeat-pad short clips, apply ``long_clip`` to long ones.

    ``n`` is 1 except for ``long_clip="chunks"`` on clips longer than ``clip_samples``.
    """
    if long_clip not in LONG_CLIP_POLICIES:
        raise ValueError(f"unknown long-clip policy {long_clip!r}; choose one of {LONG_CLIP_POLICIES}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"fit_clips takes a mono (T,) waveform, got shape {x.shape}")
    T = len(x)
    if T <= clip_samples:
        return repeat_pad(x, clip_samples)[None]
    if long_clip == "center":
        off = (T - clip_samples) // 2
        return x[None, off:off + clip_samples]
    if long_clip == "start":
        return x[None, :clip_samples]
    starts = list(range(0, T - clip_samples, clip_samples)) + [T - clip_samples]
    return np.stack([x[s:s + clip_samples] for s in starts])


def prepare_clips(x: np.ndarray, sr: int, long_clip: str = "center") -> np.ndarray:
    """Any waveform ``(T,)``/``(T, C)`` at ``sr`` -> CLAP inputs ``(n, 480000)`` float32 (steps 2-5)."""
    mono = to_mono(x)
    if mono.size == 0:
        raise ValueError("empty waveform; nothing to embed")
    if not np.isfinite(mono).all():
        raise ValueError("waveform contains NaN/Inf; clean the input")
    return fit_clips(quantize_int16(resample(mono, sr)), long_clip)


def load_clips(path: str | os.PathLike, long_clip: str = "center") -> np.ndarray:
    """Decode ``path`` and return its CLAP inputs ``(n, 480000)``; raises :class:`AudioError`."""
    x, sr = decode(path)
    return prepare_clips(x, sr, long_clip)


def load_waveform(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` to laion-clap's pre-fit waveform: mono, 48 kHz, int16 round trip ``(T,)``."""
    x, sr = decode(path)
    return quantize_int16(resample(to_mono(x), sr))
