"""Video decoding on real videos generated here with PyAV (no binary fixtures): 4 fps sampling,
resize/crop, the audio track, clear errors, and the end-to-end path into the tiny CAVP encoder."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from diffgap.core.video import VideoError, load_audio_track, load_clip, load_frames, probe  # noqa: E402

SRC_FPS = 10
LEVEL_STEP = 10  # frame i is painted with red = i * LEVEL_STEP, so the sampled index is readable back


def _frame_image(i: int, w: int, h: int, thirds: bool = False) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    if thirds:  # vertical R | G | B thirds, to tell squash from centre crop
        img[:, : w // 3, 0] = 255
        img[:, w // 3 : 2 * w // 3, 1] = 255
        img[:, 2 * w // 3 :, 2] = 255
    else:
        img[..., 0] = (i * LEVEL_STEP) % 256
        img[..., 1] = 255 - (i * LEVEL_STEP) % 256
        img[..., 2] = 64
        x0 = (4 * i) % (w - 8)  # a moving white square: real motion for the codec
        img[8:16, x0 : x0 + 8] = 255
    return img


def write_video(path: Path, seconds: float = 2.5, fps: int = SRC_FPS, size=(64, 48), audio: str | None = "aac",
                audio_rate: int = 44100, tone_hz: float = 440.0, thirds: bool = False) -> Path:
    """An H.264 (mp4) or MPEG-4 (mkv) video of coloured frames plus an optional stereo sine track."""
    w, h = size
    with av.open(str(path), mode="w") as c:
        vs = c.add_stream("libx264" if path.suffix == ".mp4" else "mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if vs.codec_context.name == "libx264":
            vs.options = {"crf": "10", "preset": "ultrafast"}
        else:
            vs.bit_rate = 4_000_000  # near-lossless for these tiny flat frames
            vs.codec_context.gop_size = 5  # keyframes every 0.5 s, so seeking to `start` matters
        aus = None
        if audio:
            aus = c.add_stream(audio, rate=audio_rate, layout="stereo")
        n_frames = int(round(seconds * fps))
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, w, h, thirds), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if aus is not None:
            n = int(round(seconds * audio_rate))
            t = np.arange(n) / audio_rate
            tone = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            fmt = "fltp" if audio == "aac" else "s16"
            chunk = 1024
            for s0 in range(0, n, chunk):
                block = np.stack([tone[s0 : s0 + chunk]] * 2)                    # (2, m)
                if fmt == "s16":
                    arr = (block.T.reshape(1, -1) * 32767).astype(np.int16)     # packed
                else:
                    arr = np.ascontiguousarray(block)
                af = av.AudioFrame.from_ndarray(arr, format=fmt, layout="stereo")
                af.sample_rate = audio_rate
                af.pts = s0
                af.time_base = Fraction(1, audio_rate)
                for p in aus.encode(af):
                    c.mux(p)
            for p in aus.encode():
                c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(d / "tone.mp4"),
        "mkv_pcm": write_video(d / "pcm.mkv", audio="pcm_s16le", audio_rate=22050, tone_hz=1000.0),
        "silent": write_video(d / "silent.mp4", audio=None),
        "wide": write_video(d / "wide.mp4", size=(96, 32), seconds=0.5, thirds=True),
    }


def _sampled_indices(frames: np.ndarray) -> list[int]:
    """Read back which source frame each output is (red channel = index * LEVEL_STEP)."""
    red = frames[:, 0, 24:, :].astype(np.float64).mean(axis=(1, 2))  # below the moving square
    return [int(round(r / LEVEL_STEP)) for r in red]


@pytest.mark.parametrize("key", ["mp4", "mkv_pcm"])
def test_frames_sampled_at_4fps(videos, key):
    frames = load_frames(videos[key], fps=4.0, size=32)
    # 2.5 s at 10 fps; targets t_k = k/4 < 2.5 show source frame floor(k * 10 / 4).
    assert frames.shape == (10, 3, 32, 32) and frames.dtype == np.uint8
    assert _sampled_indices(frames) == [int(np.floor(k * SRC_FPS / 4)) for k in range(10)]


@pytest.mark.parametrize("key", ["mp4", "mkv_pcm"])
@pytest.mark.parametrize("start, expected", [(1.0, [10, 12, 15, 17]), (1.2, [12, 14, 17, 19])])
def test_start_seeks_to_the_right_frames(videos, key, start, expected):
    f = load_frames(videos[key], fps=4.0, size=32, num_frames=4, start=start)
    assert _sampled_indices(f) == expected


def test_num_frames_padding(videos):
    # Asking for more than the video holds repeats the last frame (2.5 s -> 10 samples at 4 fps).
    f = load_frames(videos["mp4"], fps=4.0, size=32, num_frames=16)
    assert f.shape[0] == 16
    assert _sampled_indices(f)[9:] == [22] * 7


def test_squash_vs_center_crop(videos):
    squash = load_frames(videos["wide"], size=32, resize="squash")[0].astype(float)       # (3, 32, 32)
    crop = load_frames(videos["wide"], size=32, resize="center_crop")[0].astype(float)
    # Squash keeps all three colour thirds side by side; the centre crop of a 3:1 frame is the green third.
    assert squash[0, :, :8].mean() > 200 and squash[1, :, 12:20].mean() > 200 and squash[2, :, -8:].mean() > 200
    assert crop[1].mean() > 200 and crop[0].mean() < 40 and crop[2].mean() < 40


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * sr / x.size)


@pytest.mark.parametrize("key, tone", [("mp4", 440.0), ("mkv_pcm", 1000.0)])
@pytest.mark.parametrize("sr", [16000, 22050])
def test_audio_track_resampled_mono(videos, key, tone, sr):
    x = load_audio_track(videos[key], sample_rate=sr)
    assert x.ndim == 1 and x.dtype == np.float32
    # 2.5 s of tone; AAC adds up to ~one frame of encoder delay/padding.
    assert abs(x.size / sr - 2.5) < 0.06, x.size / sr
    assert abs(_dominant_hz(x, sr) - tone) < 2.0
    assert 0.3 < np.abs(x).max() < 0.6  # the 0.5-amplitude stereo sine, averaged to mono


def test_audio_start_duration_and_clip(videos):
    full = load_audio_track(videos["mkv_pcm"], sample_rate=16000)
    part = load_audio_track(videos["mkv_pcm"], sample_rate=16000, start=1.0, duration=0.5)
    assert part.size == 8000
    # The same samples; soxr's filter sees different context in the first/last few outputs.
    np.testing.assert_allclose(part[32:-32], full[16032:23968], atol=2e-3)

    class Cfg:  # duck-typed CavpConfig: what load_clip reads
        fps, image_size, num_frames, sample_rate, clip_samples = 4.0, 32, 16, 16000, 65280

    frames, clip = load_clip(videos["mkv_pcm"], Cfg)
    assert frames.shape == (16, 3, 32, 32) and clip.shape == (65280,)
    assert np.abs(clip[45000:]).max() == 0.0  # 2.5 s of audio, zero-padded to 4.08 s
    assert np.abs(clip[:39000]).max() > 0.3


def test_probe(videos):
    info = probe(videos["mp4"])
    assert (info.width, info.height) == (64, 48) and info.has_audio and info.audio_sample_rate == 44100
    assert abs(info.fps - SRC_FPS) < 1e-6 and abs(info.duration - 2.5) < 0.1
    assert not probe(videos["silent"]).has_audio


# ---- errors ---------------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_audio_less_video(videos):
    assert load_frames(videos["silent"], size=32).shape == (10, 3, 32, 32)
    with pytest.raises(VideoError, match="no-audio-stream: the video has no audio track") as e:
        load_audio_track(videos["silent"])
    assert e.value.kind == "no-audio-stream" and str(videos["silent"]) in _one_line(e)


def test_corrupt_and_missing_files(tmp_path, videos):
    with pytest.raises(VideoError, match="missing") as e:
        load_frames(tmp_path / "nope.mp4")
    _one_line(e)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty-file"):
        load_frames(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="corrupt") as e:
        load_frames(junk)
    _one_line(e)
    # A truncated mp4 (the index is at the end): FFmpeg cannot open it.
    data = videos["mp4"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match="corrupt|no-frames") as e:
        load_frames(cut)
    _one_line(e)
    with pytest.raises(VideoError, match="corrupt|no-audio"):
        load_audio_track(cut)


def test_audio_only_file_and_bad_arguments(tmp_path, videos):
    import soundfile as sf

    wav = tmp_path / "tone.wav"
    sf.write(str(wav), np.zeros(8000, np.float32), 16000)
    with pytest.raises(VideoError, match="no-video-stream") as e:
        load_frames(wav)
    assert "audio-only" in _one_line(e)
    assert load_audio_track(wav, sample_rate=8000).size == 4000  # the audio path still reads it
    with pytest.raises(VideoError, match="no-frames"):
        load_frames(videos["mp4"], start=10.0)
    with pytest.raises(ValueError, match="resize"):
        load_frames(videos["mp4"], resize="stretch")
    with pytest.raises(ValueError, match="fps > 0"):
        load_frames(videos["mp4"], fps=0)


def test_decoded_clip_into_tiny_cavp(videos):
    torch = pytest.importorskip("torch")  # noqa: F841
    from diffgap.encoders.cavp import CavpEncoder

    enc = CavpEncoder.from_config("tiny")
    frames, clip = load_clip(videos["mp4"], enc.config)
    assert frames.shape == (enc.config.num_frames, 3, enc.config.image_size, enc.config.image_size)
    v = enc.encode_video(frames[None])
    a = enc.encode_audio(clip[None])
    assert v.shape == a.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([v, a]), axis=1), 1.0, atol=1e-5)
