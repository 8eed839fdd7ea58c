"""CAVP architecture settings: :class:`CavpConfig` and the named presets (``tiny``, ``full``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from diffgap.core.errors import UserError


# ---- config -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CavpConfig:
    """Architecture and front-end settings of one CAVP encoder pair (defaults = Diff-Foley's CAVP)."""

    name: str = "full"
    embed_dim: int = 512                     # CAVP_Inference(embed_dim=512)
    # -- video (ResNet3dSlowOnly, depth 50) ------------------------------------------------------
    num_frames: int = 16                     # 4 s at 4 fps; video_pool = MaxPool1d(16)
    fps: float = 4.0                         # Extract_CAVP_Features(fps=4)
    image_size: int = 224                    # Extract_CAVP_Features(video_shape=(224, 224))
    video_base_channels: int = 64            # mmaction ResNet3d base_channels
    video_stage_blocks: tuple[int, ...] = (3, 4, 6, 3)   # ResNet-50 bottleneck counts
    video_inflate: tuple[int, ...] = (0, 0, 1, 1)         # SlowOnly: temporal kernels only in res4/res5
    # -- audio (Cnn14 on log-mel) ------------------------------------------------------------------
    sample_rate: int = 16000                 # wav2spec.py sr; PANNs Cnn14_16k initialisation
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128                        # Cnn14.bn = BatchNorm2d(128)
    f_min: float = 125.0
    f_max: float = 7600.0
    mel_frames: int = 256                    # Cnn14 time /16 -> 16 steps = spec_pool kernel
    audio_widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # Cnn14 conv_block1..6

    def __post_init__(self) -> None:
        object.__setattr__(self, "video_stage_blocks", tuple(int(b) for b in self.video_stage_blocks))
        object.__setattr__(self, "video_inflate", tuple(int(b) for b in self.video_inflate))
        object.__setattr__(self, "audio_widths", tuple(int(w) for w in self.audio_widths))
        if len(self.video_stage_blocks) != 4 or len(self.video_inflate) != 4:
            raise ValueError(f"CAVP config {self.name!r}: video_stage_blocks and video_inflate need 4 entries (ResNet stages)")
        if len(self.audio_widths) != 6:
            raise ValueError(f"CAVP config {self.name!r}: audio_widths needs 6 entries (Cnn14 conv blocks)")
        if self.image_size % 32:
            raise ValueError(f"CAVP config {self.name!r}: image_size must be a multiple of 32 (ResNet stride), got {self.image_size}")
        if self.mel_frames % 16 or self.n_mels % 32:
            raise ValueError(
                f"CAVP config {self.name!r}: mel_frames must be a multiple of 16 and n_mels of 32 "
                f"(Cnn14 pools time by 16 and mel by 32), got {self.mel_frames}/{self.n_mels}"
            )
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"CAVP config {self.name!r}: need 0 <= f_min < f_max <= sample_rate/2")

    @property
    def video_feature_dim(self) -> int:
        """Channels of the last ResNet stage (2048 for ResNet-50): bottleneck expansion 4 x base x 8."""
        return 4 * self.video_base_channels * 8

    @property
    def clip_samples(self) -> int:
        """Waveform length the audio encoder takes: a centred STFT gives 1 + N // hop frames."""
        return (self.mel_frames - 1) * self.hop_length

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("video_stage_blocks", "video_inflate", "audio_widths"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CavpConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CAVP config has unknown keys {unknown}; was it written by a newer diffgap?")
        return cls(**dict(d))


CAVP_CONFIGS: dict[str, CavpConfig] = {
    "full": CavpConfig(),
    # Same code, reduced widths/depths/resolution: for tests and the demo only.
    "tiny": CavpConfig(
        name="tiny",
        num_frames=4,
        image_size=32,
        video_base_channels=4,
        video_stage_blocks=(1, 1, 1, 1),
        sample_rate=8000,
        n_fft=128,
        hop_length=32,
        n_mels=32,
        f_min=60.0,
        f_max=3800.0,
        mel_frames=32,
        audio_widths=(4, 8, 8, 16, 16, 32),
    ),
}


def get_cavp_config(name: str | CavpConfig) -> CavpConfig:
    if isinstance(name, CavpConfig):
        return name
    if name not in CAVP_CONFIGS:
        raise UserError(f"unknown CAVP config {name!r}; choose one of {sorted(CAVP_CONFIGS)}")
    return CAVP_CONFIGS[name]
