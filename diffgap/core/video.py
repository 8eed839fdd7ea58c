"""Video decoding for CAVP: RGB frames at 4 fps resized to 224 x 224, and the audio track.

Torch-free (numpy + PyAV + soxr), so ``diffgap embed`` and a serving host share it.

Library choice: **PyAV** (``av``), the maintained Pythonic binding of FFmpeg's libav* libraries.
Its wheels bundle FFmpeg (H.264/HEVC/VP9/AV1/AAC/Opus ... decoders and swscale/swresample), so there
is no system ``ffmpeg`` binary to find or shell out to (Diff-Foley re-encodes through an
``ffmpeg`` subprocess and a temporary file, then reads it with OpenCV); one library demuxes both the
video and the audio track with exact presentation timestamps; errors come back as Python
exceptions we can turn into one-line messages. The alternatives are weaker here: ``torchvision.io``'s
video reader is deprecated, decord is unmaintained since 2022 and has no audio resampling, and
OpenCV reads no audio and hides timestamps.

Frames (:func:`load_frames`). Sampling at ``fps`` picks, for each target time
``t_k = start + k / fps``, the frame *on screen* at ``t_k`` (the last frame whose timestamp is
<= ``t_k``), which is what re-encoding with FFmpeg's ``fps`` filter gives for integer rates.
Frames are converted to RGB and resized by swscale (bilinear):

* ``resize="squash"`` (default): straight to ``size x size`` -- Diff-Foley's
  ``transforms.Resize((224, 224))``, the preprocessing its CAVP weights were used with;
* ``resize="center_crop"``: shorter side to ``size`` (aspect kept), then the centred square.

With ``num_frames`` given, a video shorter than ``num_frames / fps`` is padded by repeating its
last frame (logged); longer videos are cut at ``num_frames``. Output: ``(T, 3, size, size)`` uint8.

Audio (:func:`load_audio_track`): the first audio stream, decoded to float, averaged to mono,
resampled with soxr "HQ" (:func:`diffgap.core.audio.resample`) to ``sample_rate``; ``start``/``duration``
cut it on the same clock as the frames. :func:`load_clip` returns both for a CAVP config, aligned.

Failures raise :class:`VideoError` (a ``ValueError``) whose one-line message names the file, the
``kind`` (see :data:`VIDEO_ERRORS`) and the fix.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from diffgap.core import audio as daudio

log = logging.getLogger(__name__)

RESIZE_MODES = ("squash", "center_crop")

# kind -> what it means; the raised message adds the file and the fix.
VIDEO_ERRORS: dict[str, str] = {
    "missing": "the file does not exist",
    "empty-file": "the file has zero bytes",
    "corrupt": "FFmpeg cannot open or decode the file (not a video container, or damaged)",
    "no-video-stream": "the file has no video stream",
    "no-frames": "the video stream decodes to zero frames at or after the start time",
    "no-audio-stream": "the video has no audio track",
    "no-audio-samples": "the audio track decodes to zero samples at or after the start time",
}

_FIXES: dict[str, str] = {
    "missing": "check the path",
    "empty-file": "re-download or re-export the video",
    "corrupt": "check it plays (e.g. `ffprobe FILE`) and re-encode or re-download it",
    "no-video-stream": "pass a video file, not an audio-only file",
    "no-frames": "check the start time is inside the video",
    "no-audio-stream": "CAVP audio needs one: use a video with sound or skip this file",
    "no-audio-samples": "check the start time is inside the audio track",
}


class VideoError(ValueError):
    """A file that cannot become a CAVP input; ``kind`` is one of :data:`VIDEO_ERRORS`."""

    def __init__(self, kind: str, path: str | os.PathLike, detail: str = "") -> None:
        if kind not in VIDEO_ERRORS:
            raise ValueError(f"unknown video error kind {kind!r}")
        self.kind = kind
        self.path = str(path)
        detail = f" ({detail.splitlines()[0]})" if detail else ""
        super().__init__(f"{path}: {kind}: {VIDEO_ERRORS[kind]}{detail}; {_FIXES[kind]}")


@dataclass(frozen=True)
class VideoInfo:
    duration: float | None     # seconds, from the container (None when it does not say)
    fps: float | None          # the video stream's average frame rate
    width: int
    height: int
    has_audio: bool
    audio_sample_rate: int | None


def _open(path: str | os.PathLike):
    import av

    p = Path(path)
    if not p.is_file():
        raise VideoError("missing", p)
    if p.stat().st_size == 0:
        raise VideoError("empty-file", p)
    try:
        return av.open(str(p), mode="r")
    except Exception as e:  # av.FFmpegError subclasses (InvalidDataError ...), OSError
        raise VideoError("corrupt", p, f"{type(e).__name__}: {e}") from None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Container metadata without decoding."""
    with _open(path) as c:
        if not c.streams.video:
            raise VideoError("no-video-stream", path)
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        duration = float(c.duration) / 1_000_000 if c.duration is not None else None  # AV_TIME_BASE = 1e6
        rate = float(v.average_rate) if v.average_rate else None
        return VideoInfo(duration, rate, int(v.codec_context.width), int(v.codec_context.height),
                         a is not None, int(a.rate) if a is not None else None)


def _resize_rgb(frame, size: int, resize: str) -> np.ndarray:
    """One decoded ``av.VideoFrame`` -> (3, size, size) uint8 RGB."""
    if resize == "squash":
        rgb = frame.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray()
    else:
        w, h = frame.width, frame.height
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="BILINEAR").to_ndarray()
        top, left = (nh - size) // 2, (nw - size) // 2
        rgb = rgb[top : top + size, left : left + size]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))                  # (3, size, size)


def _decoded_frames(c, path) -> Iterator[Any]:
    try:
        yield from c.decode(video=0)
    except Exception as e:
        raise VideoError("corrupt", path, f"{type(e).__name__}: {e}") from None


def load_frames(
    path: str | os.PathLike,
    fps: float = 4.0,
    size: int = 224,
    num_frames: int | None = None,
    start: float = 0.0,
    resize: str = "squash",
) -> np.ndarray:
    """Decode ``path`` to frames sampled at ``fps`` from ``start`` seconds: (T, 3, size, size) uint8.

    ``num_frames=None`` keeps every sample time inside the video; an int returns exactly that many
    (last frame repeated if the video is shorter).
    """
    if fps <= 0 or size < 1 or start < 0 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need fps > 0, size >= 1, start >= 0, num_frames >= 1; got {fps}, {size}, {start}, {num_frames}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    out: list[np.ndarray] = []
    k = 0
    eps = 1e-6  # timestamps are rationals; a frame exactly at t_k counts as on screen at t_k

    def target(i: int) -> float:
        return start + i / fps

    with _open(path) as c:
        if not c.streams.video:
            raise VideoError("no-video-stream", path)
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        frame_dur = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / 25.0
        if start > 0 and stream.time_base:
            # Jump to the keyframe at or before `start` instead of decoding everything before it.
            try:
                c.seek(int(start / float(stream.time_base)), stream=stream, backward=True, any_frame=False)
            except Exception as e:  # unseekable input: decode from the beginning instead
                log.debug("%s: seek to %gs failed (%s); decoding from the start", path, start, e)
        prev, prev_rgb, prev_time, n_seen = None, None, 0.0, 0

        def emit(frame) -> None:
            nonlocal prev_rgb, k
            if frame is prev:
                if prev_rgb is None:  # convert a frame once, however often it is repeated
                    prev_rgb = _resize_rgb(prev, size, resize)
                out.append(prev_rgb)
            else:  # a target before the first frame: a player shows the first frame
                out.append(_resize_rgb(frame, size, resize))
            k += 1

        for frame in _decoded_frames(c, path):
            ft = frame.time if frame.time is not None else n_seen * frame_dur
            n_seen += 1
            # Every target before this frame's timestamp shows the previous frame.
            while (num_frames is None or k < num_frames) and target(k) < ft - eps:
                emit(prev if prev is not None else frame)
            if num_frames is not None and k >= num_frames:
                break
            prev, prev_rgb, prev_time = frame, None, ft
        else:
            # Stream ended: the last frame stays on screen for one frame duration.
            while prev is not None and (num_frames is None or k < num_frames) and target(k) < prev_time + frame_dur - eps:
                emit(prev)
    if n_seen == 0:
        raise VideoError("no-frames", path, "the video stream holds no decodable frame")
    if not out:
        raise VideoError("no-frames", path, f"start={start:g}s")
    if num_frames is not None and len(out) < num_frames:
        log.info("%s: %d of %d frames at %g fps; repeating the last frame", path, len(out), num_frames, fps)
        out.extend([out[-1]] * (num_frames - len(out)))
    return np.stack(out)


def load_audio_track(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    start: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """The first audio stream of a video as mono float32 at ``sample_rate``: (N,)."""
    import av

    if sample_rate < 1 or start < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"need sample_rate >= 1, start >= 0, duration > 0; got {sample_rate}, {start}, {duration}")
    with _open(path) as c:
        if not c.streams.audio:
            raise VideoError("no-audio-stream", path)
        stream = c.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # keep the layout and rate; planar float samples
        chunks: list[np.ndarray] = []
        t0: float | None = None
        native_sr: int | None = None
        try:
            for frame in c.decode(stream):
                if t0 is None:
                    t0 = frame.time if frame.time is not None else 0.0
                    native_sr = frame.sample_rate
                for f in to_float.resample(frame):
                    chunks.append(f.to_ndarray())                        # (channels, n)
            for f in to_float.resample(None):                            # flush
                chunks.append(f.to_ndarray())
        except Exception as e:
            raise VideoError("corrupt", path, f"{type(e).__name__}: {e}") from None
    if not chunks or native_sr is None:
        raise VideoError("no-audio-samples", path)
    x = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)    # (C, N)
    x = daudio.to_mono(x.T)                                              # (N,)
    # Align to the container clock: samples before the track's first timestamp are silence.
    offset = int(round((start - (t0 or 0.0)) * native_sr))
    if offset < 0:
        x = np.concatenate([np.zeros(-offset, np.float32), x])
    else:
        x = x[offset:]
    if duration is not None:
        x = x[: int(round(duration * native_sr))]
    if x.size == 0:
        raise VideoError("no-audio-samples", path, f"start={start:g}s")
    if not np.isfinite(x).all():
        raise VideoError("corrupt", path, "the audio track decodes to NaN/Inf")
    return daudio.resample(x, native_sr, sample_rate)


def load_clip(path: str | os.PathLike, config: Any, start: float = 0.0, resize: str = "squash") -> tuple[np.ndarray, np.ndarray]:
    """Frames and audio of one CAVP clip, aligned from ``start`` seconds.

    ``config`` is a :class:`diffgap.encoders.cavp.CavpConfig` (read by attribute, so this module stays
    torch-free). Returns ``frames (num_frames, 3, S, S) uint8`` and ``audio (clip_samples,) float32``
    (zero-padded when the track is shorter).
    """
    frames = load_frames(path, fps=config.fps, size=config.image_size, num_frames=config.num_frames,
                         start=start, resize=resize)
    audio = load_audio_track(path, sample_rate=config.sample_rate, start=start,
                             duration=config.clip_samples / config.sample_rate)
    clip = np.zeros(config.clip_samples, np.float32)
    n = min(clip.size, audio.size)
    clip[:n] = audio[:n]
    return frames, clip
