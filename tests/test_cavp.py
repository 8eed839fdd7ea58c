"""CAVP encoders: checkpoint layout, mel front end vs librosa, shapes/normalisation/determinism,
ONNX export parity (ORT CPU) at B = 1, 3, 8, and checkpoint refusal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgap.core.errors import UserError
from diffgap.encoders.cavp import (
    CAVP_CONFIGS,
    CavpAudioEncoderModule,
    CavpConfig,
    CavpEncoder,
    CavpModel,
    CavpVideoEncoderModule,
    LogMelSpectrogram,
    get_cavp_config,
    slaney_mel_filterbank,
)
from diffgap.core.iospec import IOSpec

TINY = CAVP_CONFIGS["tiny"]
FULL = CAVP_CONFIGS["full"]


def _randomise_norms(model: CavpModel, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine params and data-calibrated running stats (as a trained
    model has), so parity and checkpoint round trips exercise them; fresh BNs are near-identities."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(0.75 + 0.5 * torch.rand(m.num_features, generator=g))
            m.bias.copy_(0.05 * torch.randn(m.num_features, generator=g))
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        model.train()
        cfg = model.config
        model.encode_video(torch.rand(4, cfg.num_frames, 3, cfg.image_size, cfg.image_size, generator=g))
        model.encode_audio(0.3 * torch.randn(4, cfg.clip_samples, generator=g))
        model.eval()
        for m in bns:
            m.momentum = 0.1


@pytest.fixture(scope="module")
def tiny() -> CavpEncoder:
    enc = CavpEncoder.from_config("tiny", seed=0, batch_size=4)
    _randomise_norms(enc.model)
    return enc


def _frames(b: int, seed: int, cfg: CavpConfig = TINY) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((b, cfg.num_frames, 3, cfg.image_size, cfg.image_size), dtype=np.float32)


def _waves(b: int, seed: int, cfg: CavpConfig = TINY) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(cfg.clip_samples) / cfg.sample_rate
    f = rng.uniform(100, cfg.f_max * 0.8, size=(b, 1))
    return (0.5 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal((b, cfg.clip_samples))).astype(np.float32)


# ---- checkpoint layout (names from Diff-Foley's published CAVP_Inference / cavp_modules.py) ------
# Literal key names and shapes a released Diff-Foley CAVP state dict has (after stripping "module."):
# mmcv ConvModule children conv/bn, mmaction layer{X}.{Y}.conv{n}, Cnn14 conv_block{n}/fc1/final_project.
PUBLISHED_KEYS = {
    "video_encoder.conv1.conv.weight": (64, 3, 1, 7, 7),
    "video_encoder.conv1.bn.running_mean": (64,),
    "video_encoder.layer1.0.conv1.conv.weight": (64, 64, 1, 1, 1),
    "video_encoder.layer1.0.conv2.conv.weight": (64, 64, 1, 3, 3),
    "video_encoder.layer1.0.downsample.conv.weight": (256, 64, 1, 1, 1),
    "video_encoder.layer1.0.downsample.bn.weight": (256,),
    "video_encoder.layer2.3.conv3.conv.weight": (512, 128, 1, 1, 1),
    "video_encoder.layer3.0.conv1.conv.weight": (256, 512, 3, 1, 1),   # inflated 3x1x1 (res4)
    "video_encoder.layer3.5.conv2.bn.num_batches_tracked": (),
    "video_encoder.layer4.2.conv1.conv.weight": (512, 2048, 3, 1, 1),  # inflated 3x1x1 (res5)
    "video_encoder.layer4.2.conv3.bn.running_var": (2048,),
    "video_project_head.weight": (512, 2048),
    "video_project_head.bias": (512,),
    "spec_encoder.bn.weight": (128,),
    "spec_encoder.conv_block1.conv1.weight": (64, 1, 3, 3),
    "spec_encoder.conv_block1.bn1.running_mean": (64,),
    "spec_encoder.conv_block6.conv2.weight": (2048, 2048, 3, 3),
    "spec_encoder.conv_block6.bn2.bias": (2048,),
    "spec_encoder.fc1.weight": (2048, 2048),
    "spec_encoder.final_project.weight": (512, 2048),
    "spec_encoder.final_project.bias": (512,),
    "logit_scale": (),
}


def test_full_model_matches_published_checkpoint_layout():
    torch.manual_seed(0)
    model = CavpModel("full")
    sd = model.state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape), shape)
    # Only the published top-level modules own state; the mel front end's constants are not saved.
    assert {k.split(".")[0] for k in sd} == {"video_encoder", "video_project_head", "spec_encoder", "logit_scale"}
    assert not any(k.startswith("video_encoder.layer1.0.conv1.conv.bias") for k in sd)  # bias-free convs
    # ResNet3D-50 SlowOnly backbone: 31.6M parameters (mmaction2 model zoo); Cnn14 trunk ~79.7M.
    n_backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith("video_encoder."))
    assert n_backbone == 31_634_496
    n_cnn14 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("spec_encoder."))
    assert n_cnn14 == 80_723_008
    with torch.no_grad():
        # Spatial size only changes the pooled map; a small input checks the full-width forward path.
        v = model.encode_video(torch.rand(1, 2, 3, 64, 64))
        a = model.encode_spec(torch.rand(1, FULL.n_mels, 32))
    assert v.shape == a.shape == (1, 512)
    assert torch.allclose(v.norm(dim=-1), torch.ones(1)) and torch.allclose(a.norm(dim=-1), torch.ones(1))


# ---- mel front end vs librosa ---------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [FULL, TINY], ids=["full", "tiny"])
def test_mel_filterbank_matches_librosa(cfg):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max)
    ours = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
    assert ours.shape == ref.shape == (cfg.n_mels, cfg.n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def _librosa_cavp_spec(y: np.ndarray, cfg: CavpConfig) -> np.ndarray:
    """Diff-Foley wav2spec.py TRANSFORMS with librosa 0.8 defaults (centre, reflect pad), float64."""
    import librosa

    mag = np.abs(librosa.stft(y.astype(np.float64), n_fft=cfg.n_fft, hop_length=cfg.hop_length, center=True, pad_mode="reflect"))
    mel = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max) @ mag
    x = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip((x + 100) / 100, 0, 1)


@pytest.mark.parametrize("cfg", [FULL, TINY], ids=["full", "tiny"])
def test_logmel_matches_diff_foley_transform(cfg):
    pytest.importorskip("librosa")
    y = _waves(2, seed=1, cfg=cfg)
    y[1, : cfg.clip_samples // 3] = 0.0  # silence exercises the 1e-5 floor and the clip at 0
    with torch.no_grad():
        ours = LogMelSpectrogram(cfg)(torch.from_numpy(y)).numpy()
    ref = np.stack([_librosa_cavp_spec(row, cfg) for row in y])
    assert ours.shape == ref.shape == (2, cfg.n_mels, cfg.mel_frames)
    # float32 DFT-as-conv vs float64 FFT: 1e-4 in the [0, 1] normalised dB/100 domain = 0.01 dB.
    assert np.abs(ours - ref).max() <= 1e-4


# ---- encoder behaviour ------------------------------------------------------------------------------
def test_tiny_shapes_normalisation_determinism(tiny):
    v = tiny.encode_video(_frames(3, seed=0))
    a = tiny.encode_audio(_waves(5, seed=0))
    assert v.shape == (3, 512) and a.shape == (5, 512)
    assert v.dtype == np.float32 and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # Deterministic: same call twice, and a second encoder built from the same seed.
    np.testing.assert_array_equal(v, tiny.encode_video(_frames(3, seed=0)))
    other = CavpEncoder.from_config("tiny", seed=0)
    _randomise_norms(other.model)
    np.testing.assert_allclose(other.encode_audio(_waves(5, seed=0)), a, atol=1e-6)
    # Batch-independent: each row equals encoding it alone (eval-mode BN, no cross-row ops).
    np.testing.assert_allclose(tiny.encode_audio(_waves(5, seed=0)[2:3]), a[2:3], atol=1e-5)
    np.testing.assert_allclose(tiny.encode_video(_frames(3, seed=0)[1:2]), v[1:2], atol=1e-5)
    # Different inputs give different embeddings.
    assert np.abs(v[0] - v[1]).max() > 1e-3 and np.abs(a[0] - a[1]).max() > 1e-3


def test_uint8_frames_equal_scaled_float(tiny):
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, size=(2, TINY.num_frames, 3, TINY.image_size, TINY.image_size), dtype=np.uint8)
    np.testing.assert_allclose(tiny.encode_video(u8), tiny.encode_video(u8.astype(np.float32) / 255.0), atol=1e-6)


def test_prepare_audio_pads_and_crops_from_start(tiny):
    n = TINY.clip_samples
    short = np.ones(n // 2, np.float32)
    long = np.arange(n + 500, dtype=np.float32) / (n + 500)
    x = tiny.prepare_audio([short, long])
    assert x.shape == (2, n)
    assert torch.all(x[0, : n // 2] == 1) and torch.all(x[0, n // 2 :] == 0)
    assert torch.equal(x[1], torch.from_numpy(long[:n]))
    np.testing.assert_allclose(tiny.encode_audio([short]), tiny.encode_audio(x[:1].numpy()), atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 2, 10), np.float32), "mono"),
    ([np.zeros(0, np.float32)], "empty"),
    (np.full((1, 100), np.nan, np.float32), "NaN"),
    (np.zeros((1, 100), np.int32), "float"),
    ([np.zeros((2, 100), np.float32)], "1-D"),
])
def test_bad_audio_is_refused(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode_audio(bad)


def test_bad_frames_are_refused(tiny):
    with pytest.raises(ValueError, match=r"frames must be \(B, 4, 3, 32, 32\).*load_frames"):
        tiny.encode_video(np.zeros((1, TINY.num_frames + 1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="frames must be"):
        tiny.encode_video(np.zeros((1, TINY.num_frames, 32, 32, 3), np.float32))  # channels-last


def test_config_round_trip_and_errors():
    for cfg in CAVP_CONFIGS.values():
        assert CavpConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        CavpConfig.from_dict({**TINY.to_dict(), "depth": 101})
    with pytest.raises(UserError, match="unknown CAVP config"):
        get_cavp_config("huge")
    with pytest.raises(ValueError, match="multiple of 16"):
        CavpConfig(mel_frames=250)
    assert FULL.clip_samples == 65280 and FULL.num_frames == 16 and FULL.fps == 4.0
    # A changed setting survives the round trip and changes the model it builds.
    changed = CavpConfig.from_dict({**TINY.to_dict(), "embed_dim": 64})
    assert CavpEncoder.from_config(changed).encode_audio(_waves(1, 0)).shape == (1, 64)


# ---- I/O declaration + ONNX parity --------------------------------------------------------------
def test_io_specs(tiny):
    vm, am = tiny.video_module, tiny.audio_module
    assert isinstance(vm, CavpVideoEncoderModule) and isinstance(am, CavpAudioEncoderModule)
    assert not vm.training and not am.training  # exporters restore the wrapper's own mode
    v, a = vm.io_spec(), am.io_spec()
    assert v.name == "cavp_video_encoder" and a.name == "cavp_audio_encoder"
    assert v.inputs[0].shape == ("batch", 4, 3, 32, 32) and a.inputs[0].shape == ("batch", TINY.clip_samples)
    assert v.outputs[0].shape == a.outputs[0].shape == ("batch", 512)
    for io in (v, a):
        assert IOSpec.from_dict(io.to_dict()) == io
        assert io.check_feeds(io.sample_inputs(2)) == 2
        assert CavpConfig.from_dict(io.meta["cavp_config"]) == TINY


@pytest.mark.parametrize("which", ["video", "audio"])
def test_onnx_export_parity(tiny, which, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from diffgap.export.onnx_export import export_module

    module = tiny.video_module if which == "video" else tiny.audio_module
    io = module.io_spec()
    path = tmp_path / f"{io.name}.onnx"
    export_module(module, io, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == io.input_names
    assert [o.name for o in sess.get_outputs()] == io.output_names
    for b in (1, 3, 8):
        feeds = io.sample_inputs(b, seed=b)
        with torch.no_grad():
            ref = module(*[torch.from_numpy(feeds[n]) for n in io.input_names]).numpy()
        out = sess.run(io.output_names, feeds)[0]
        assert out.shape == (b, 512) and out.dtype == np.float32
        # Same float32 ops in a different order (ORT conv/matmul kernels): 1e-4 on unit vectors.
        assert np.abs(out - ref).max() <= 1e-4, (which, b)


# ---- checkpoints ----------------------------------------------------------------------------------
def _diff_foley_style_ckpt(model: CavpModel, path, mutate=None) -> None:
    """A checkpoint laid out like Diff-Foley's training output: {"state_dict": {"module.<key>": ...}}."""
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    if mutate:
        mutate(sd)
    torch.save({"epoch": 66, "state_dict": sd}, path)


def test_checkpoint_round_trip(tiny, tmp_path):
    path = tmp_path / "cavp.ckpt"
    _diff_foley_style_ckpt(tiny.model, path)
    loaded = CavpEncoder.from_checkpoint(path, config="tiny")
    np.testing.assert_array_equal(loaded.encode_video(_frames(2, 5)), tiny.encode_video(_frames(2, 5)))
    np.testing.assert_array_equal(loaded.encode_audio(_waves(2, 5)), tiny.encode_audio(_waves(2, 5)))
    # safetensors with bare keys loads too.
    from safetensors.torch import save_file

    st = tmp_path / "cavp.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(st))
    np.testing.assert_array_equal(CavpEncoder.from_checkpoint(st, config="tiny").encode_audio(_waves(1, 7)),
                                  tiny.encode_audio(_waves(1, 7)))


def _rename(sd, old, new):
    sd[new] = sd.pop(old)


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: _rename(sd, "module.spec_encoder.fc1.weight", "module.spec_encoder.fc_1.weight"),
     r"lacks key 'spec_encoder\.fc1\.weight'"),
    (lambda sd: sd.__setitem__("module.video_project_head.weight", torch.zeros(512, 7)),
     r"'video_project_head\.weight' has shape \(512, 7\), expected \(512, 128\)"),
    (lambda sd: sd.__setitem__("module.audio_projection.weight", torch.zeros(3)),
     r"unexpected key 'audio_projection\.weight'"),
])
def test_checkpoint_mismatch_is_refused(tiny, tmp_path, mutate, match):
    path = tmp_path / "bad.ckpt"
    _diff_foley_style_ckpt(tiny.model, path, mutate)
    with pytest.raises(UserError, match=match):
        CavpEncoder.from_checkpoint(path, config="tiny")


def test_checkpoint_wrong_config_and_bad_files(tiny, tmp_path):
    path = tmp_path / "tiny.ckpt"
    _diff_foley_style_ckpt(tiny.model, path)
    # A checkpoint against another width: the first key already has another shape.
    wider = CavpConfig.from_dict({**TINY.to_dict(), "name": "tiny-wide", "video_base_channels": 8})
    with pytest.raises(UserError, match=r"'video_encoder\.conv1\.conv\.weight' has shape \(4, 3, 1, 7, 7\), expected \(8, 3, 1, 7, 7\)"):
        CavpEncoder.from_checkpoint(path, config=wider)
    with pytest.raises(FileNotFoundError, match="not found"):
        CavpEncoder.from_checkpoint(tmp_path / "missing.ckpt", config="tiny")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot read CAVP checkpoint"):
        CavpEncoder.from_checkpoint(junk, config="tiny")
    listy = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], listy)
    with pytest.raises(UserError, match="not a state dict"):
        CavpEncoder.from_checkpoint(listy, config="tiny")
