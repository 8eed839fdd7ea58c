"""diffgap.core.audio == laion-clap's data path (non-fusion), on real generated signals; listed errors."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from diffgap.core import audio as A

SR = A.SAMPLE_RATE


def sweep(seconds: float, sr: int, f0: float = 50.0, f1: float = 8000.0, amp: float = 0.5) -> np.ndarray:
    """Exponential sine sweep (T,) float32."""
    t = np.arange(int(seconds * sr)) / sr
    k = np.log(f1 / f0) / seconds
    return (amp * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)).astype(np.float32)


@pytest.fixture(scope="module")
def laion_data():
    import torch  # noqa: F401  (laion-clap's data helpers are torch-side)
    from laion_clap.training import data

    return data


def laion_fit(laion_data, x: np.ndarray) -> np.ndarray:
    import torch

    cfg = {"sample_rate": SR, "clip_samples": A.CLIP_SAMPLES, "hop_size": 480, "mel_bins": 64}
    d = laion_data.get_audio_features({}, torch.from_numpy(x), A.CLIP_SAMPLES, "rand_trunc", "repeatpad", cfg)
    return d["waveform"].numpy()


def test_runtime_modules_are_torch_free():
    code = "import sys, diffgap.core.audio, diffgap.core.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantize_matches_laion(laion_data):
    x = np.concatenate([sweep(1.0, SR), np.array([1.5, -2.0, 0.99999, -1e-6], np.float32)])
    ref = laion_data.int16_to_float32(laion_data.float32_to_int16(x))
    np.testing.assert_array_equal(A.quantize_int16(x), ref)


@pytest.mark.parametrize("n", [1, 777, 48000, 200000, 240000, 479999, 480000])
def test_repeat_pad_matches_laion(laion_data, n):
    x = sweep(n / SR, SR) if n > 1 else np.array([0.25], np.float32)
    out = A.fit_clips(x)
    assert out.shape == (1, A.CLIP_SAMPLES) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], laion_fit(laion_data, x))


def test_long_clip_policies_are_deterministic():
    x = sweep(25.0, SR)  # 25 s -> 1 200 000 samples
    T = len(x)
    center = A.fit_clips(x, "center")
    np.testing.assert_array_equal(center[0], x[(T - A.CLIP_SAMPLES) // 2:][: A.CLIP_SAMPLES])
    np.testing.assert_array_equal(A.fit_clips(x, "start")[0], x[: A.CLIP_SAMPLES])
    chunks = A.fit_clips(x, "chunks")
    # windows at 0 and 480000, then one aligned to the end (laion-clap audio_infer tiling)
    assert chunks.shape == (3, A.CLIP_SAMPLES)
    np.testing.assert_array_equal(chunks[1], x[480000:960000])
    np.testing.assert_array_equal(chunks[2], x[-A.CLIP_SAMPLES:])
    np.testing.assert_array_equal(A.fit_clips(x, "chunks"), chunks)
    with pytest.raises(ValueError, match="long-clip policy"):
        A.fit_clips(x, "random")


@pytest.mark.parametrize("sr", [16000, 44100, 48000])
def test_file_path_matches_librosa(tmp_path, sr):
    """decode + mono + soxr-HQ resample == laion-clap's librosa.load(sr=48000) (+ int16 round trip)."""
    import librosa

    x = np.stack([sweep(1.0, sr), 0.3 * sweep(1.0, sr, f0=200)], axis=1)  # stereo 1 s
    path = tmp_path / f"s{sr}.wav"
    sf.write(path, x, sr, subtype="FLOAT")
    ours = A.load_waveform(path)
    ref, _ = librosa.load(str(path), sr=SR)
    ref = A.quantize_int16(ref)
    assert ours.shape == ref.shape and abs(len(ours) - SR) <= 1
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_stereo_is_channel_mean():
    x = np.stack([np.ones(10, np.float32), -np.ones(10, np.float32) * 0.5], axis=1)
    np.testing.assert_allclose(A.to_mono(x), np.full(10, 0.25, np.float32))


def test_silence_and_short_clip_prepare():
    assert not A.prepare_clips(np.zeros(SR, np.float32), SR).any()
    one_sec = A.prepare_clips(sweep(1.0, 16000), 16000)
    assert one_sec.shape == (1, A.CLIP_SAMPLES)
    # 10 whole copies of the resampled second fill exactly 10 s
    np.testing.assert_array_equal(one_sec[0, :SR], one_sec[0, SR:2 * SR])


def test_prepare_rejects_bad_arrays():
    with pytest.raises(ValueError, match="empty"):
        A.prepare_clips(np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match="NaN"):
        A.prepare_clips(np.array([0.0, np.nan], np.float32), SR)
    with pytest.raises(ValueError, match="sample rate"):
        A.prepare_clips(np.zeros(10, np.float32), 0)


def test_listed_decode_errors(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.wav"
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty-file"] = tmp_path / "empty.wav"
    (tmp_path / "notes.wav").write_text("this is a caption file, not audio\n" * 20)
    cases["not-audio"] = tmp_path / "notes.wav"
    good = tmp_path / "good.wav"
    sf.write(good, sweep(0.5, 16000), 16000)
    raw = good.read_bytes()
    (tmp_path / "corrupt.wav").write_bytes(raw[:12] + bytes(range(256)) * 4)
    cases["corrupt"] = tmp_path / "corrupt.wav"
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 16000)
    cases["no-samples"] = tmp_path / "zero.wav"
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    cases["non-finite"] = tmp_path / "nan.wav"
    for kind, path in cases.items():
        with pytest.raises(A.AudioError) as ei:
            A.load_clips(path)
        assert ei.value.kind == kind, (kind, str(ei.value))
        assert str(path) in str(ei.value)
    assert set(cases) == set(A.AUDIO_ERRORS)
    assert A.load_clips(good).shape == (1, A.CLIP_SAMPLES)
