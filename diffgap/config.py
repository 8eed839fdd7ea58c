"""Architecture, diffusion and training settings as dataclasses, plus the named-preset registry.

Torch-free. Checkpoints carry ``DiffGAPConfig.to_dict()`` in their ``config.json`` so loading never
needs the flags that trained a model; CLI ``--preset`` choices come from :data:`PRESETS`.

Presets (parameter counts printed by ``diffgap train`` and asserted in tests/test_model.py):

* ``clap-512`` (default): 512-d CLAP space, 512-d linear contrastive heads (0.53M parameters for
  both), two denoisers of 3 adaLN-zero residual MLP blocks, width 256, MLP
  ratio 2, beside a conditional-mean branch of 3 residual MLP blocks, width 384 -- 4.37M
  parameters per direction, 9.27M in total (``DiffGAP.parameter_counts()``).
* ``clap-tiny``: 512-d inputs, 64-d heads, width 64, 1 block (64k per direction) -- for tests only.

Adding a preset (e.g. ``cavp-512`` for video<->audio) is one ``PRESETS[...] = ...`` line.

A preset fixes the sizes (head dim D, denoiser widths and depths), not the input widths: ``diffgap
train`` takes each modality's embedding width E from the training data (384 for MiniLM, 512 for CLAP,
768 elsewhere; the two modalities may differ) and the checkpoint carries it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("x0", "eps", "v")
BRIDGE_MODES = ("source", "noise")
SCHEDULES_TRAIN = ("auto", "two-stage", "joint")


@dataclass
class HeadsConfig:
    """Light projection heads: frozen CLAP/CAVP embedding (B, E) -> contrastive space (B, dim)."""

    dim: int = 512                 # head-space (contrastive space) dimension D
    # Residual MLP width beside the linear map; 0 = linear head only (the default). MLP heads are a
    # candidate that `diffgap train --val` trains beside the linear ones (``train.head_mlp_hidden``) and
    # keeps only on a validated gain: they gained +0.1 [-0.8, +1.0] validation head R@1 on `diffgap synth`
    # and -1.0 [-3.1, +1.4] on the real-encoder benchmark (README), so the nonlinear part of the model is
    # the denoisers' conditional-mean branch instead.
    hidden: int = 0
    # Raw-space model: the heads stay the identity (never trained), so head space is the frozen encoder's
    # own space and the denoisers sample there. Needs dim == embed_dim and hidden == 0. The alternative to
    # mapping a trained model's samples back through its heads (diffgap.generation.HeadInverse); the
    # raw-space prior table of `diffgap eval` measures either checkpoint.
    identity: bool = False
    init_temperature: float = 0.07  # CLIP's initial InfoNCE temperature (Radford et al. 2021)
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100 to keep training stable


@dataclass
class DenoiserConfig:
    """One conditional denoiser x0_hat = f(x_t, t, condition) in head space."""

    hidden: int = 256              # residual stream width H
    depth: int = 3                 # number of adaLN-zero residual MLP blocks
    mlp_ratio: float = 2.0         # block MLP width = mlp_ratio * H
    time_freq_dim: int = 128       # sinusoidal timestep features before the timestep MLP
    # Also feed the condition as input, beside adaLN: with adaLN alone an early denoiser ignored the
    # condition at high noise (its held-out x0 error was about the same with the true and with a
    # shuffled condition); with the concatenation the condition lowers it.
    concat_condition: bool = True
    cond_dropout: float = 0.1      # P(condition -> learned null) during training, for CFG
    # Width of the condition-only conditional-mean branch added to the output (CARD, Han et al. 2022;
    # diffgap.models.ConditionMean); 0 = none. Configs written before it existed load with 0.
    mean_hidden: int = 384


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"         # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020)
    num_train_timesteps: int = 1000  # T
    prediction: str = "x0"           # network target: "x0" | "eps" | "v" (x0: the bridge's output is the network's)
    # The retrieval bridge (bridge(), the export, the runtime and the ``full`` row of `diffgap eval`):
    # K = 1 from noise is one denoiser call at t = T-1, whose x0 estimate is the posterior mean
    # E[x0 | condition]. For retrieval the mean is what scores well (`make demo`'s eval table in the
    # README: rows `q-bridge`, the mean, and `q-bridge noise`, K = 10 samples from noise); K-step
    # samples are for generation (the generative-prior table of `diffgap eval` compares them).
    sample_steps: int = 1            # K DDIM steps used by bridge() unless overridden
    eta: float = 0.0                 # DDIM stochasticity; 0 = deterministic given the initial noise
    guidance_scale: float = 1.0      # classifier-free guidance; 1 = conditional output only
    bridge_mode: str = "noise"       # "noise": from N(0, I) at t = T-1; "source": from the source embedding noised to t0
    bridge_t0: float = 0.3           # start time as a fraction of T for bridge_mode="source"


@dataclass
class TrainConfig:
    # Fixed-step runs (``diffgap train`` without ``--val``). Not more by default: much longer runs let
    # the denoisers memorise a 20k-pair train split (their train x0-InfoNCE keeps falling while the
    # held-out bridge gets worse); ``--val`` chooses the budget by early stopping instead.
    steps: int = 600
    batch_size: int = 512           # pairs per step for the heads' InfoNCE (more negatives, cheap)
    denoiser_batch_size: int = 128  # the first rows of each batch also train the denoisers (their cost dominates)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05      # cosine decays to lr * min_lr_ratio
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    # Weight of InfoNCE on predicted clean embeddings (see diffgap.train.diffgap_loss). With the
    # terminal share below, 0.3 gave a higher posterior-mean validation R@1 than 0.1 (denoisers on
    # frozen heads, synthetic benchmark).
    lambda_x0: float = 0.3
    x0_infonce_min_t: float = 0.5   # that InfoNCE only for t > x0_infonce_min_t * T
    source_t_frac: float = 0.1      # fraction of each batch with t drawn in [0, bridge_t0*T] (what source-bridging sees)
    # Fraction of each batch at t = T-1, where the x0 estimate is the retrieval bridge's posterior
    # mean; the rest (0.2) is uniform on [0, T-1] for the K-step sampler. Without a terminal share
    # few rows land at t = T-1 and that estimate (the only one the retrieval bridge uses) stays far
    # worse on validation.
    terminal_t_frac: float = 0.7
    seed: int = 0
    # Validation-driven training (``diffgap train --val``; diffgap.train_val): the step budget comes
    # from early stopping, ``steps`` above is then unused. Every ``val_every`` steps the EMA weights
    # are scored on the validation split; after ``patience`` evaluations without a new best the LR
    # is multiplied by ``plateau_factor`` (at most ``plateau_decays`` times; heads:
    # ``head_plateau_decays``), and the next plateau ends the stage. The ``max_*`` caps only bound a
    # run whose validation figure keeps improving.
    schedule: str = "auto"          # "two-stage" | "joint" | "auto" (train both, keep the better on val)
    val_every: int = 50             # denoiser (and joint) stages: validate every 50 steps, stop after 3 x 50 without a best
    patience: int = 3
    # Heads: steps are cheaper and their validation R@1 is noisy early on (the temperature is still
    # moving), so they get a coarser check: every 100 steps, 3 evaluations (`make demo` in the README:
    # heads best at step 800 of 1,100).
    head_val_every: int = 100
    head_patience: int = 3
    plateau_factor: float = 0.3
    # Denoiser-type stages (denoisers, joint, the regression-bridge control) stop at their first
    # plateau: in every such stage `make demo` and the real-encoder benchmark have printed
    # ("best at step S of N (1 lr decay(s))" with N = S + 2 x patience x val_every, e.g.
    # benchmarks/results/realdata-20261203/train.txt), the best came before the LR decay, so the
    # decayed phase only spent another patience x val_every = 150 steps. The heads keep one decay: in `make demo` their best came after it.
    plateau_decays: int = 0
    head_plateau_decays: int = 1
    # Heads-only steps are cheaper than denoiser steps (`make demo` in the README: 1,100 head steps
    # in 26 s, 1,100 denoiser steps in 144 s).
    max_head_steps: int = 6000
    max_denoiser_steps: int = 3000
    val_max_pairs: int = 1000       # validation pairs scored per evaluation (the first N)
    # Nonlinear heads, chosen by validation (``--val`` only): heads with a residual MLP of this width
    # are trained beside the config's own heads (``heads.hidden``) and kept only when their validation
    # head R@1 is higher with a paired-bootstrap 95% interval above zero (both directions' queries);
    # 0 = no such candidate. Encoders trained apart (no shared space) may need the nonlinear map that
    # two towers trained together do not.
    head_mlp_hidden: int = 512


@dataclass
class DiffGAPConfig:
    name: str = "clap-512"
    # E: the frozen embeddings' width (model inputs). A preset's value is its default; training takes
    # the widths from the data (:meth:`with_input_dims`), and ``embed_dims`` holds a width per
    # modality where the two differ (e.g. {"text": 384, "audio": 768}); :meth:`input_dim` reads both.
    embed_dim: int = 512
    modalities: tuple[str, str] = ("text", "audio")
    embed_dims: dict[str, int] = field(default_factory=dict)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if len(self.modalities) != 2 or self.modalities[0] == self.modalities[1]:
            raise ValueError(f"preset {self.name!r}: modalities must be two distinct names, got {self.modalities}")
        if self.diffusion.schedule not in SCHEDULES:
            raise ValueError(f"preset {self.name!r}: schedule {self.diffusion.schedule!r} unknown; use one of {SCHEDULES}")
        if self.diffusion.prediction not in PREDICTIONS:
            raise ValueError(f"preset {self.name!r}: prediction {self.diffusion.prediction!r} unknown; use one of {PREDICTIONS}")
        if self.diffusion.bridge_mode not in BRIDGE_MODES:
            raise ValueError(f"preset {self.name!r}: bridge_mode {self.diffusion.bridge_mode!r} unknown; use one of {BRIDGE_MODES}")
        if not 0.0 < self.diffusion.bridge_t0 <= 1.0:
            raise ValueError(f"preset {self.name!r}: bridge_t0 must be in (0, 1], got {self.diffusion.bridge_t0}")
        if min(self.train.source_t_frac, self.train.terminal_t_frac) < 0 or self.train.source_t_frac + self.train.terminal_t_frac > 1:
            raise ValueError(f"preset {self.name!r}: train.source_t_frac + train.terminal_t_frac must be within [0, 1]")
        if self.train.schedule not in SCHEDULES_TRAIN:
            raise ValueError(f"preset {self.name!r}: train.schedule {self.train.schedule!r} unknown; use one of {SCHEDULES_TRAIN}")
        self.embed_dims = {str(m): int(w) for m, w in dict(self.embed_dims).items()}
        unknown = sorted(set(self.embed_dims) - set(self.modalities))
        if unknown:
            raise ValueError(f"preset {self.name!r}: embed_dims names {unknown}, not one of its modalities {self.modalities}")
        if min(self.embed_dim, *self.embed_dims.values(), self.heads.dim, self.denoiser.hidden, self.denoiser.depth) < 1:
            raise ValueError(f"preset {self.name!r}: dims and depth must be positive")
        if self.heads.identity and (self.heads.hidden != 0 or any(self.embed_dims.get(m, self.embed_dim) != self.heads.dim
                                                                    for m in self.modalities)):
            raise ValueError(f"preset {self.name!r}: identity heads need heads.dim == every embedding width and heads.hidden == 0")

    def input_dim(self, modality: str) -> int:
        """E of ``modality``: the width of its frozen embeddings (the model's input)."""
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; this model has {list(self.modalities)}")
        return self.embed_dims.get(modality, self.embed_dim)

    @property
    def input_dims(self) -> dict[str, int]:
        """``{modality: E}`` for both modalities."""
        return {m: self.input_dim(m) for m in self.modalities}

    def with_input_dims(self, dims: dict[str, int]) -> "DiffGAPConfig":
        """Copy whose input widths are ``dims`` (``{modality: E}``, e.g. a dataset's); the sizes stay.

        One common width is stored as ``embed_dim`` (the layout every diffgap version reads), differing
        widths as ``embed_dims``.
        """
        widths = {m: int(dims[m]) for m in self.modalities}
        if len(set(widths.values())) == 1:
            return self.replace(embed_dim=next(iter(widths.values())), embed_dims={})
        return self.replace(embed_dims=widths)

    @property
    def directions(self) -> tuple[str, str]:
        """``("<b>_given_<a>", "<a>_given_<b>")``, e.g. ``("audio_given_text", "text_given_audio")``."""
        a, b = self.modalities
        return (f"{b}_given_{a}", f"{a}_given_{b}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        if not self.embed_dims:  # one width: the layout configs had before per-modality widths existed
            del d["embed_dims"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffGAPConfig":
        subs = {"heads": HeadsConfig, "denoiser": DenoiserConfig, "diffusion": DiffusionConfig, "train": TrainConfig}
        kw: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; was it written by a newer diffgap?")
        for k, v in d.items():
            # sections written before these options existed: their models were trained without them
            if k == "denoiser":
                v = {"mean_hidden": 0, **v}
            if k == "train":
                v = {"terminal_t_frac": 0.0, "plateau_decays": 1, **v}
            if k in subs:
                sub_known = {f.name for f in dataclasses.fields(subs[k])}
                bad = sorted(set(v) - sub_known)
                if bad:
                    raise ValueError(f"config section {k!r} has unknown keys {bad}; was it written by a newer diffgap?")
                kw[k] = subs[k](**v)
            else:
                kw[k] = tuple(v) if k == "modalities" else (dict(v) if k == "embed_dims" else v)
        return cls(**kw)

    def replace(self, **changes: Any) -> "DiffGAPConfig":
        """Copy with top-level or dotted changes, e.g. ``cfg.replace(**{"diffusion.prediction": "v"})``."""
        d = self.to_dict()
        for key, value in changes.items():
            parts = key.split(".")
            tgt = d
            for p in parts[:-1]:
                tgt = tgt[p]
            if parts[-1] not in tgt and not (len(parts) == 1 and parts[0] == "embed_dims"):
                raise ValueError(f"unknown config field {key!r}")
            tgt[parts[-1]] = value
        return DiffGAPConfig.from_dict(d)


# ---- presets --------------------------------------------------------------------------------
PRESETS: dict[str, DiffGAPConfig] = {}
DEFAULT_PRESET = "clap-512"

PRESETS["clap-512"] = DiffGAPConfig(name="clap-512")
PRESETS["clap-tiny"] = DiffGAPConfig(
    name="clap-tiny",
    heads=HeadsConfig(dim=64, hidden=64),
    denoiser=DenoiserConfig(hidden=64, depth=1, time_freq_dim=32, mean_hidden=64),
    train=TrainConfig(steps=60, batch_size=64, denoiser_batch_size=32, warmup_steps=5, lr=3e-3,
                      val_every=10, patience=2, head_val_every=10, head_patience=2, max_head_steps=400,
                      max_denoiser_steps=300, head_mlp_hidden=0),
)
# Generation tests: clap-tiny's denoisers with square linear heads, which generation inverts exactly
# (diffgap.generation.HeadInverse).
PRESETS["clap-tiny-gen"] = PRESETS["clap-tiny"].replace(name="clap-tiny-gen", **{"heads.dim": 512, "heads.hidden": 0})
# Raw-space models (heads.identity): clap-512's denoisers sampling directly in the raw CLAP space a
# generator is conditioned in. Trained with the two-stage schedule (the heads stage is skipped).
_RAW = {"heads.identity": True, "train.schedule": "two-stage", "train.head_mlp_hidden": 0}
PRESETS["clap-512-raw"] = PRESETS["clap-512"].replace(name="clap-512-raw", **_RAW)
PRESETS["clap-tiny-raw"] = PRESETS["clap-tiny-gen"].replace(name="clap-tiny-raw", **_RAW)
# Video <-> audio in the 512-d CAVP space (Diff-Foley's Stage-1 encoders, diffgap/encoders/cavp.py):
# the CLAP presets' architecture unchanged; directions audio_given_video and video_given_audio.
PRESETS["cavp-512"] = PRESETS["clap-512"].replace(name="cavp-512", modalities=["video", "audio"])
PRESETS["cavp-tiny"] = PRESETS["clap-tiny"].replace(name="cavp-tiny", modalities=["video", "audio"])
PRESETS["cavp-tiny-gen"] = PRESETS["clap-tiny-gen"].replace(name="cavp-tiny-gen", modalities=["video", "audio"])
PRESETS["cavp-512-raw"] = PRESETS["clap-512-raw"].replace(name="cavp-512-raw", modalities=["video", "audio"])


def get_preset(name: str) -> DiffGAPConfig:
    """A fresh copy of the named preset (callers may mutate it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DiffGAPConfig.from_dict(PRESETS[name].to_dict())
