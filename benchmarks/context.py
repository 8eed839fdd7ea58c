"""What every group shares: sizes, timing policy, the model, the exports and the machine roofline."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import TimingPolicy

# Full-run sizes and the --quick sizes used by the smoke test.
FULL = {
    "steps": (10, 25, 50),
    "batches": (1, 8, 64),
    "encoder_batches": (1, 8),
    "pipeline_batches": (1, 8),
    "concurrency": (1, 2, 4, 8),
}
QUICK = {
    "steps": (2,),
    "batches": (1, 4),
    "encoder_batches": (1, 2),
    "pipeline_batches": (1,),
    "concurrency": (1, 2),
}
# The goal rows: fused ORT vs eager at B=1, K=25; roofline at B=64.
GOAL_STEPS = 25
GOAL_SPEEDUP_BATCH = 1
GOAL_ROOFLINE_BATCH = 64


@dataclass
class Context:
    preset: str
    quick: bool
    steps: tuple[int, ...]
    batches: tuple[int, ...]
    encoder_batches: tuple[int, ...]
    pipeline_batches: tuple[int, ...]
    concurrency: tuple[int, ...]
    policy: TimingPolicy
    threads: int
    work: Path                                  # scratch: checkpoint, exports, Triton repository
    encoders: str | None = None                 # CLAP encoders to export: "tiny" | "htsat-tiny" (default by mode)
    cache: Path | None = None                   # reusable exports (see prepare._export); None = export afresh
    direction: str = "audio_given_text"         # the denoiser timed in the K x B grid
    checkpoint: Path | None = None
    model: Any = None                           # diffgap.models.DiffGAP (torch), eval mode
    compiled_model: Any = None                  # model view with the timed denoiser torch.compile'd
    exports: dict[int, Path] = field(default_factory=dict)  # K -> export dir holding the fused samplers
    main_export: Path | None = None             # full export (encoders too) for pipeline / Triton
    main_steps: int | None = None               # K of main_export's samplers
    roofline: dict[str, Any] = field(default_factory=dict)
    tensor_guidance: dict[int, bool] = field(default_factory=dict)  # K -> eager loop passes a tensor guidance scale
    notes: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.direction.partition("_given_")[2]

    @property
    def target(self) -> str:
        return self.direction.partition("_given_")[0]

    @property
    def sampler_name(self) -> str:
        """Export name of the timed direction, e.g. ``diffgap_text_to_audio``."""
        from diffgap.core.names import sampler_name

        return sampler_name(self.source, self.target)
