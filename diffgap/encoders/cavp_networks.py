"""CAVP networks (Diff-Foley's Stage-1 contrastive audio-visual pre-training), written here in PyTorch.

CAVP (Luo et al., "Diff-Foley", NeurIPS 2023) defines the video<->audio embedding space DiffGAP bridges:

* video: SlowOnly ResNet3D-50 on RGB frames at 4 fps, 224 x 224, values in [0, 1] (Diff-Foley's demo
  transform is ``Resize((224, 224)) + ToTensor()``, no mean/std normalisation) -> spatial mean ->
  per-time-step ``Linear(2048, 512)`` -> max over time.
* audio: a PANNs Cnn14-style CNN on a log-mel spectrogram -> per-time-step 512-d -> max over time.

Both outputs are L2-normalised float32 (B, 512).

Where the architecture and the checkpoint names come from (Diff-Foley's public code, luosiallen/Diff-Foley;
none of its code is copied here):

* ``inference/model/cavp_model.py`` (class ``CAVP_Inference``, built by ``inference/config/
  Stage1_CAVP.yaml``: ``video_encode: Slowonly_pool``, ``spec_encode: cnn14_pool``, ``embed_dim: 512``)
  owns the top-level modules ``video_encoder`` (``ResNet3dSlowOnly(depth=50)``), ``video_project_head``
  (``nn.Linear(2048, 512)``), ``video_pool`` (``MaxPool1d(16)``: no parameters), ``spec_encoder``
  (``Cnn14(embed_dim=512)``), ``spec_project_head`` (``nn.Identity``), ``spec_pool`` and the scalar
  ``logit_scale``. Its ``encode_video`` takes (B, T, 3, H, W) and permutes to (B, 3, T, H, W); its
  ``encode_spec`` takes (B, n_mels, T) and feeds Cnn14 (B, 1, T, n_mels).
* ``inference/model/cavp_modules.py``: ``ResNet3dSlowOnly`` is mmaction2's ResNet3d pathway with
  ``conv1_kernel=(1, 7, 7)``, ``inflate=(0, 0, 1, 1)``, ``inflate_style='3x1x1'``, no pool2, spatial
  strides (1, 2, 2, 2), bottleneck blocks (3, 4, 6, 3). Every conv is an mmcv ``ConvModule`` whose
  children are ``conv`` (bias-free Conv3d) and ``bn`` (BatchNorm3d) -- the same file's 2d-inflation code
  maps ``layer{X}.{Y}.conv{n}.conv`` / ``.bn`` and ``downsample.conv`` / ``downsample.bn``, which fixes
  the key names ``video_encoder.conv1.conv.weight``, ``video_encoder.layer3.0.conv1.bn.running_mean``,
  ``video_encoder.layer1.0.downsample.conv.weight`` ... Its forward ends with
  ``AdaptiveAvgPool2d((1, 1))`` applied to the 5-D (B, C, T, h, w) map, which PyTorch computes as a mean
  over the last two axes: a spatial mean per time step. ``Cnn14`` has ``bn = BatchNorm2d(128)`` over the
  mel axis, ``conv_block1..6`` (each ``conv1``, ``conv2``, ``bn1``, ``bn2``; widths 64..2048; 2x2 average
  pools, then (1, 2), then (1, 1)), ``fc1 = Linear(2048, 2048)`` and ``final_project = Linear(2048, 512)``.
  Its forward applies ``relu(fc1(.))`` *twice* (the same layer) before ``final_project``; reproduced
  below because the released weights were trained that way.
* ``inference/demo_util.py`` loads the CAVP checkpoint with ``torch.load``, unwraps ``"state_dict"``
  when present and strips DDP's ``"module."`` prefix; :func:`load_cavp_state_dict` does the same and
  then requires the exact key set and shapes (strict), refusing with the first mismatch.

So this module names its submodules exactly like ``CAVP_Inference``; after unwrapping, a released
checkpoint's keys map onto :class:`CavpModel` one-to-one (identity mapping) and the mapping is asserted
key by key, with shapes, in ``tests/test_cavp.py`` against the names above.

Audio front end. 22.05 kHz / 80 mels / 125-7600 Hz, often quoted for Diff-Foley, are Diff-Foley's *Stage-2*
(latent diffusion) spectrogram settings (``inverse_op`` in ``demo_util.py``). The CAVP audio encoder
itself cannot take 80 mels: its first layer is ``BatchNorm2d(128)`` over the mel axis, the training
code's Cnn14 smoke input is (2, 1, 256, 128) and it is initialised from PANNs ``Cnn14_16k``; Diff-Foley's
``data_preprocess/wav2spec.py`` gives the matching transform: 16 kHz, n_fft 1024, hop 256, 128 mels,
125-7600 Hz, magnitude (power 1), then ``(20 * log10(max(mel, 1e-5)) - 20 + 100) / 100`` clipped to
[0, 1]. The ``full`` config therefore uses 16 kHz / 128 mels so that released checkpoints load; every
front-end constant is a :class:`CavpConfig` field. 256 mel frames (centred STFT) = 65,280 samples
(4.08 s) -- the length at which Cnn14's 16x time reduction gives the 16 steps ``spec_pool``
(``MaxPool1d(16)``) reduces to one; video uses 16 frames = 4 s at 4 fps for the same reason.

The mel spectrogram is computed in torch from constant tensors (a periodic Hann-windowed DFT as a
strided ``conv1d``, the Slaney mel filterbank as a matmul; both built once in numpy), so the exported
ONNX graph needs no librosa/numpy and contains only Pad/Conv/Mul/Sqrt/MatMul/Log. The filterbank and
STFT match librosa 0.8's defaults used by Diff-Foley (Slaney mel scale and area norm, centred frames
with reflect padding); ``tests/test_cavp.py`` checks both against librosa.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cavp_config import CavpConfig, get_cavp_config


# ---- helpers: mel filterbank and DFT kernels (numpy, built once) ------------------------------
def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale (librosa htk=False): linear below 1 kHz (200/3 Hz per mel),
    # logarithmic above with 27 mels per factor 6.4.
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mel = f / f_sp
    high = f >= min_log_hz
    mel[high] = min_log_mel + np.log(f[high] / min_log_hz) / logstep
    return mel


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    f = m * f_sp
    high = m >= min_log_mel
    f[high] = min_log_hz * np.exp(logstep * (m[high] - min_log_mel))
    return f


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular mel filters on the Slaney scale with area ("slaney") normalisation: (n_mels, n_fft//2+1).

    Same definition as ``librosa.filters.mel(htk=False, norm="slaney")`` (librosa's default, used by
    Diff-Foley's ``wav2spec.py``).
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_pts = np.linspace(_hz_to_mel_slaney(np.array([f_min]))[0], _hz_to_mel_slaney(np.array([f_max]))[0], n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)                      # (n_mels + 2,) filter edges/centres
    widths = np.diff(hz_pts)                                 # (n_mels + 1,)
    ramps = hz_pts[:, None] - fft_freqs[None, :]             # (n_mels + 2, F)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    fb = np.maximum(0.0, np.minimum(lower, upper))           # (n_mels, F)
    fb *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]        # unit area per filter
    return fb.astype(np.float32)


def _dft_kernels(n_fft: int) -> np.ndarray:
    """Periodic-Hann-windowed real DFT as conv1d weights: (2 * (n_fft//2+1), 1, n_fft), [cos; sin]."""
    n = np.arange(n_fft, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)     # scipy/librosa "hann", fftbins=True
    k = np.arange(n_fft // 2 + 1, dtype=np.float64)[:, None]
    phase = 2.0 * np.pi * k * n[None, :] / n_fft
    kernels = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window], axis=0)
    return kernels[:, None, :].astype(np.float32)


# ---- audio: log-mel front end ------------------------------------------------------------------
class LogMelSpectrogram(nn.Module):
    """waveform (B, N) -> Diff-Foley's normalised log-mel (B, n_mels, 1 + N // hop) in [0, 1]."""

    # wav2spec.py TRANSFORMS: LowerThresh(1e-5), Log10, *20, -20, +100, /100, Clip(0, 1).
    AMIN = 1e-5

    def __init__(self, cfg: CavpConfig) -> None:
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        self.n_freq = cfg.n_fft // 2 + 1
        # Non-persistent: derived constants, never part of a checkpoint's state dict.
        self.register_buffer("dft", torch.from_numpy(_dft_kernels(cfg.n_fft)), persistent=False)
        fb = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        self.register_buffer("mel_fb", torch.from_numpy(fb), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.unsqueeze(1)                                               # (B, 1, N)
        # librosa.stft(center=True) with librosa 0.8's default reflect padding (Diff-Foley pins 0.8.0).
        x = F.pad(x, (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        spec = F.conv1d(x, self.dft, stride=self.hop)                           # (B, 2F, T)
        re, im = spec[:, : self.n_freq], spec[:, self.n_freq :]
        mag = torch.sqrt(re * re + im * im)                                     # power 1 (magnitude)
        mel = torch.matmul(self.mel_fb, mag)                                    # (B, n_mels, T)
        db = 20.0 * torch.log10(torch.clamp(mel, min=self.AMIN)) - 20.0
        return torch.clamp((db + 100.0) / 100.0, 0.0, 1.0)


# ---- audio: Cnn14 ------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """PANNs conv block: (3x3 conv, BN, ReLU) x 2, then 2-D average pooling."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight)  # PANNs init_layer

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        if pool != (1, 1):
            x = F.avg_pool2d(x, kernel_size=pool)
        return x


class Cnn14(nn.Module):
    """PANNs Cnn14 trunk as CAVP uses it: spec (B, 1, T, n_mels) -> per-step embedding (B, T/16, E)."""

    # (time, mel) average-pool sizes after conv_block1..6, as in PANNs/Diff-Foley.
    POOLS = ((2, 2), (2, 2), (2, 2), (2, 2), (1, 2), (1, 1))

    def __init__(self, n_mels: int, widths: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n_mels)   # normalises each mel bin over time (input transposed)
        chans = [1, *widths]
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(chans[i], chans[i + 1]))
        self.fc1 = nn.Linear(widths[-1], widths[-1])
        self.final_project = nn.Linear(widths[-1], embed_dim)
        for lin in (self.fc1, self.final_project):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x.transpose(1, 3)).transpose(1, 3)                          # (B, 1, T, M)
        for i, pool in enumerate(self.POOLS):
            x = getattr(self, f"conv_block{i + 1}")(x, pool)
        x = x.mean(dim=3)                                                       # (B, C, T/16)
        x = F.max_pool1d(x, 3, stride=1, padding=1) + F.avg_pool1d(x, 3, stride=1, padding=1)
        x = x.transpose(1, 2)                                                   # (B, T/16, C)
        # The released Cnn14 applies the same fc1 (+ReLU) twice; the weights expect it.
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc1(x))
        return self.final_project(x)                                            # (B, T/16, E)


# ---- video: ResNet3D SlowOnly ------------------------------------------------------------------
class ConvBN3d(nn.Module):
    """mmcv ``ConvModule`` layout: ``conv`` (Conv3d, no bias) then ``bn`` (BatchNorm3d), optional ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1),
                 padding: tuple[int, int, int] = (0, 0, 0), relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(out_ch)
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv kaiming_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Bottleneck3d(nn.Module):
    """mmaction2 Bottleneck3d, "pytorch" style (stride on the 3x3), inflate_style "3x1x1"."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, spatial_stride: int, inflate: bool, downsample: ConvBN3d | None) -> None:
        super().__init__()
        if inflate:   # temporal kernel 3 on the 1x1 conv (SlowOnly res4/res5)
            k1, p1 = (3, 1, 1), (1, 0, 0)
        else:
            k1, p1 = (1, 1, 1), (0, 0, 0)
        self.conv1 = ConvBN3d(inplanes, planes, k1, padding=p1)
        self.conv2 = ConvBN3d(planes, planes, (1, 3, 3), stride=(1, spatial_stride, spatial_stride), padding=(0, 1, 1))
        self.conv3 = ConvBN3d(planes, planes * self.expansion, (1, 1, 1), relu=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet3dSlowOnly(nn.Module):
    """SlowOnly ResNet3D: video (B, 3, T, H, W) -> per-time-step features (B, C, T) (spatial mean)."""

    def __init__(self, base: int, stage_blocks: Sequence[int], inflate: Sequence[int]) -> None:
        super().__init__()
        # Stem: (1, 7, 7) conv, spatial stride 2, then (1, 3, 3) max-pool stride 2; time untouched.
        self.conv1 = ConvBN3d(3, base, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3))
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        inplanes = base
        for i, n_blocks in enumerate(stage_blocks):
            planes = base * 2**i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * Bottleneck3d.expansion:
                downsample = ConvBN3d(inplanes, planes * 4, (1, 1, 1), stride=(1, stride, stride), relu=False)
            blocks = [Bottleneck3d(inplanes, planes, stride, bool(inflate[i]), downsample)]
            inplanes = planes * Bottleneck3d.expansion
            blocks += [Bottleneck3d(inplanes, planes, 1, bool(inflate[i]), None) for _ in range(1, n_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(3, 4))                                               # (B, C, T)


# ---- model (checkpoint layout) -----------------------------------------------------------------
class CavpModel(nn.Module):
    """Both CAVP towers, named exactly like Diff-Foley's ``CAVP_Inference`` so checkpoints map 1:1."""

    def __init__(self, cfg: CavpConfig | str = "full") -> None:
        super().__init__()
        self.config = cfg = get_cavp_config(cfg)
        self.video_encoder = ResNet3dSlowOnly(cfg.video_base_channels, cfg.video_stage_blocks, cfg.video_inflate)
        self.video_project_head = nn.Linear(cfg.video_feature_dim, cfg.embed_dim)
        self.spec_encoder = Cnn14(cfg.n_mels, cfg.audio_widths, cfg.embed_dim)
        # CLIP's initial temperature; kept so the released state dict loads strictly. Unused here.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.mel = LogMelSpectrogram(cfg)
        self.eval()

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, 3, H, W) in [0, 1] -> L2-normalised (B, E)."""
        feat = self.video_encoder(frames.permute(0, 2, 1, 3, 4))               # (B, C, T)
        feat = self.video_project_head(feat.transpose(1, 2))                    # (B, T, E)
        # video_pool = MaxPool1d(16) over exactly 16 steps == max over time.
        return F.normalize(feat.amax(dim=1), dim=-1)

    def encode_spec(self, spec: torch.Tensor) -> torch.Tensor:
        """spec (B, n_mels, T) normalised log-mel -> L2-normalised (B, E)."""
        feat = self.spec_encoder(spec.unsqueeze(1).transpose(2, 3))             # (B, T/16, E)
        return F.normalize(feat.amax(dim=1), dim=-1)

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (B, clip_samples) mono at ``config.sample_rate`` -> L2-normalised (B, E)."""
        return self.encode_spec(self.mel(waveform))
