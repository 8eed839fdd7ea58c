"""Captions -> CLAP text embedding -> N bridged audio-embedding samples -> a diffusers generator's
``prompt_embeds`` -> waveforms (``diffgap generate`` and its Python API, :func:`generate`).

The generator is a local diffusers folder (``save_pretrained`` layout) of ``AudioLDMPipeline`` or
``MusicLDMPipeline``; both pass ``prompt_embeds`` (B, E) to the UNet as ``class_labels``. The text
embedding comes from the generator's own text tower (:class:`diffgap.encoders.hf_clap.HFClapEncoder`,
the pipelines' prompt encoding), so ``--no-bridge`` is the stock generator: its own text embedding as
the condition, and its own empty-prompt embedding as the negative one under guidance. Both are passed
explicitly, which also keeps MusicLDM working with ``transformers`` 5 (its prompt path expects
``get_text_features`` to return a tensor).

Determinism: the bridge's noise and the generator's latents come from seeds
(:mod:`diffgap.core.generation`); every waveform has its own ``torch.Generator``.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .core.errors import UserError
from .core.generation import GEN_GUIDANCE, GEN_STEPS, caption_seeds, latent_seed

log = logging.getLogger(__name__)

GENERATOR_INDEX = "model_index.json"
# The pipeline classes whose UNet takes a CLAP embedding as ``class_labels``, and the components
# (save_pretrained sub-folders) each needs.
GENERATOR_COMPONENTS: dict[str, dict[str, str]] = {
    "AudioLDMPipeline": {
        "text_encoder": "the CLAP text tower (ClapTextModelWithProjection)", "tokenizer": "its RoBERTa tokenizer",
        "unet": "the UNet2DConditionModel", "vae": "the AutoencoderKL", "vocoder": "the SpeechT5HifiGan vocoder",
        "scheduler": "the scheduler config",
    },
}
GENERATOR_COMPONENTS["MusicLDMPipeline"] = {
    **GENERATOR_COMPONENTS["AudioLDMPipeline"], "text_encoder": "the full ClapModel",
    "feature_extractor": "the ClapFeatureExtractor",
}
JSON_NAME = "generation.json"
FORMAT = "diffgap-generation/1"


def load_generator(folder: str | os.PathLike, device: str = "cpu"):
    """A local AudioLDM/MusicLDM folder -> the diffusers pipeline (no hub access)."""
    folder = Path(folder)
    layout = "a diffusers AudioLDM/MusicLDM folder written by save_pretrained (model_index.json + one folder per component)"
    if not folder.is_dir():
        raise UserError(f"generator folder {folder} does not exist; pass {layout}")
    if not (folder / GENERATOR_INDEX).is_file():
        raise UserError(f"{folder} has no {GENERATOR_INDEX}; pass {layout}")
    try:
        index = json.loads((folder / GENERATOR_INDEX).read_text())
    except ValueError as e:
        raise UserError(f"{folder / GENERATOR_INDEX} is not valid JSON ({e}); save the pipeline again with save_pretrained") from None
    cls_name = index.get("_class_name")
    if cls_name not in GENERATOR_COMPONENTS:
        raise UserError(f"{folder} holds a {cls_name!r}; diffgap generate drives {sorted(GENERATOR_COMPONENTS)} "
                        "(CLAP-conditioned UNets that take prompt_embeds)")
    for comp, what in GENERATOR_COMPONENTS[cls_name].items():
        if not (folder / comp).is_dir():
            raise UserError(f"{folder} has no {comp}/ folder: put {what} there ({cls_name}.save_pretrained layout)")
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder), local_files_only=True)
    return pipe.to(device)


def _call_default(pipe, name: str) -> Any:
    return inspect.signature(type(pipe).__call__).parameters[name].default


@torch.no_grad()
def run_generator(
    pipe,
    prompt_embeds: np.ndarray | torch.Tensor,       # (M, E) unit-norm CLAP conditions, one per waveform
    latent_seeds: Sequence[int],                    # (M,) one seed per waveform (core.generation.latent_seed)
    negative_embeds: np.ndarray | torch.Tensor | None = None,  # (E,) or (1, E): the condition guidance pushes away from
    num_inference_steps: int | None = None,
    audio_length_in_s: float | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The generator's waveforms (M, L) float32 for M conditions; deterministic given the seeds."""
    dev = pipe.unet.device
    dtype = pipe.unet.dtype
    # a copy: arrays from Triton's request tensors are read-only, which torch warns about
    pe = (prompt_embeds if torch.is_tensor(prompt_embeds) else torch.tensor(np.asarray(prompt_embeds, np.float32))).to(dev, dtype)
    if pe.ndim != 2 or len(pe) != len(latent_seeds):
        raise ValueError(f"prompt_embeds must be (M, E) with one latent seed per row, got {tuple(pe.shape)} and {len(latent_seeds)} seeds")
    g = float(_call_default(pipe, "guidance_scale") if guidance_scale is None else guidance_scale)
    kw: dict[str, Any] = {}
    if g > 1.0:
        if negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_embeds (the generator's empty-prompt embedding)")
        neg = torch.as_tensor(np.asarray(negative_embeds, np.float32) if not torch.is_tensor(negative_embeds) else negative_embeds)
        kw["negative_prompt_embeds"] = neg.reshape(1, -1).to(dev, dtype).expand(len(pe), -1)
    if num_inference_steps is not None:
        kw["num_inference_steps"] = int(num_inference_steps)
    if audio_length_in_s is not None:
        kw["audio_length_in_s"] = float(audio_length_in_s)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in latent_seeds]
    pipe.set_progress_bar_config(disable=not progress, desc="generator steps")
    out = pipe(prompt_embeds=pe, guidance_scale=g, generator=gens, num_waveforms_per_prompt=1, output_type="np", **kw)
    return np.asarray(out.audios, np.float32).reshape(len(pe), -1)


@dataclass
class GenerationSettings:
    n: int = 1                               # waveforms per caption
    seeds: list[int] = field(default_factory=lambda: [0])  # one per caption, or one s (caption b: s + b)
    bridge: bool = True                      # False: the stock generator (text embedding as the condition)
    steps: int = GEN_STEPS                   # K of the bridge
    guidance_scale: float = GEN_GUIDANCE     # the bridge's classifier-free guidance
    num_inference_steps: int | None = None   # the generator's steps (None: the pipeline's default)
    audio_length_in_s: float | None = None   # None: the pipeline's default
    generator_guidance: float | None = None  # the generator's guidance scale (None: the pipeline's default)


@dataclass
class GenerationResult:
    captions: list[str]
    waveforms: np.ndarray          # (B, N, L) float32
    conditions: np.ndarray         # (B, N, E) what the UNet received as class_labels (before its dtype cast)
    text_embeddings: np.ndarray    # (B, E)
    sample_rate: int
    record: dict[str, Any]         # what generation.json holds


def generate(
    captions: Sequence[str],
    generator: str | os.PathLike | Any,
    checkpoint: str | os.PathLike | None = None,
    settings: GenerationSettings | None = None,
    any_clap: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> GenerationResult:
    """Captions -> N waveforms each. ``generator``: a folder or a loaded pipeline; ``checkpoint``: the
    DiffGAP checkpoint (required unless ``settings.bridge`` is False)."""
    from .encoders.hf_clap import HFClapEncoder

    s = settings or GenerationSettings()
    captions = [str(c) for c in captions]
    if not captions:
        raise UserError("no captions given; pass at least one caption")
    if s.n < 1:
        raise UserError(f"-n must be >= 1, got {s.n}")
    seeds = caption_seeds(s.seeds if len(s.seeds) > 1 else s.seeds[0], len(captions))
    pipe = generator if not isinstance(generator, (str, os.PathLike)) else load_generator(generator, device)
    source = str(generator) if isinstance(generator, (str, os.PathLike)) else type(generator).__name__
    enc = HFClapEncoder.from_pipeline(pipe, source)
    text = enc.encode_text_tensor(captions).cpu().numpy()                          # (B, E)
    record: dict[str, Any] = {"format": FORMAT, "captions": captions, "generator": source,
                              "generator_class": type(pipe).__name__, "clap": enc.identity(),
                              "settings": asdict(s) | {"seeds": seeds.tolist()}}
    if s.bridge:
        from .generation import check_encoder, resolve_model, sample_conditions

        if checkpoint is None:
            raise UserError("bridged generation needs --checkpoint (a DiffGAP checkpoint trained on this generator's CLAP); "
                            "or pass --no-bridge for the stock generator")
        model, meta = resolve_model(checkpoint)
        if model.config.directions[0] != "audio_given_text":
            raise UserError(f"checkpoint preset {model.config.name!r} bridges {' <-> '.join(model.config.modalities)}; diffgap generate "
                            "conditions a text-to-audio generator: pass a text<->audio checkpoint")
        check_encoder(meta, enc.identity(), any_encoder=any_clap)
        if model.config.input_dim("text") != enc.embed_dim:
            raise UserError(f"the checkpoint takes {model.config.input_dim('text')}-d text embeddings but the generator's CLAP emits "
                            f"{enc.embed_dim}-d; train on embeddings from this generator's CLAP")
        cond = sample_conditions(model, text, s.n, seeds, s.steps, s.guidance_scale)   # (B, N, E)
        record["checkpoint"] = str(checkpoint)
    else:
        cond = np.repeat(text[:, None, :], s.n, axis=1)
    B, N, E = cond.shape
    lseeds = [latent_seed(int(seeds[b]), j) for b in range(B) for j in range(N)]
    g = float(_call_default(pipe, "guidance_scale") if s.generator_guidance is None else s.generator_guidance)
    neg = enc.encode_text_tensor([""]).cpu().numpy() if g > 1.0 else None
    wav = run_generator(pipe, cond.reshape(B * N, E), lseeds, neg, s.num_inference_steps, s.audio_length_in_s, g, progress)
    record["latent_seeds"] = [lseeds[b * N:(b + 1) * N] for b in range(B)]
    record["generator_guidance"] = g
    sr = int(pipe.vocoder.config.sampling_rate)
    record["sample_rate"] = sr
    return GenerationResult(captions, wav.reshape(B, N, -1), cond, text, sr, record)


def write_outputs(result: GenerationResult, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """WAV files ``<caption index>_<sample index>.wav`` + ``generation.json``, as one atomic directory."""
    import soundfile as sf

    from .core.fsutil import atomic_dir

    out = Path(out)
    files = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for b, per_caption in enumerate(result.waveforms):
            row = []
            for j, w in enumerate(per_caption):
                name = f"{b:03d}_{j:02d}.wav"
                sf.write(str(tmp / name), np.clip(w, -1.0, 1.0), result.sample_rate, subtype="PCM_16")
                row.append(name)
            files.append(row)
        (tmp / JSON_NAME).write_text(json.dumps({**result.record, "files": files}, indent=2, sort_keys=True) + "\n")
    return out
