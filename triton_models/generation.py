"""The generation repository: caption -> N raw-space condition samples -> (optionally) waveforms.

Models, planned with the retrieval repository's planner (:mod:`diffgap.triton_models.repository`:
same flavours, options, python-model and exported-graph configs), every tensor read from the
export's ``manifest.json``:

==================================  ==============================================================
``generator_tokenizer``             python: ``TYPE_STRING`` captions -> the generator CLAP's token feeds
``generator_text_encoder``          exported graph: the generator's CLAP text tower
                                    (``export/generator_text.py``; python+ORT CPU | ``tensorrt_plan``
                                    | ``onnxruntime_onnx``)
``text_to_audio_condition_noise``   python: per caption, N samples: the condition repeated, seeded
                                    noise, guidance, and each sample's generator latent seed
``text_to_audio_condition_sampler`` exported graph: the fused K-step raw-space generation sampler
``text_to_audio_condition``         ensemble: tokenizer -> text encoder -> noise -> sampler
``audio_generator``                 python (torch): a local diffusers AudioLDM/MusicLDM folder,
                                    condition rows -> waveforms (only with ``generator=DIR``)
``text_to_audio_waveform``          ensemble: ... -> sampler -> generator (only with ``generator=DIR``)
==================================  ==============================================================

Rows. A request of B captions asks for N samples each (``samples``, one value per request; default
:attr:`GenerationOptions.samples`). From the noise step on, the ensemble carries B x N rows, sample j
of caption b at row ``b * N + j`` -- the fused graph's and :func:`diffgap.generation.sample_conditions`'s
layout -- so ``condition``, ``latent_seed`` and ``waveform`` come back with B x N rows while
``clap_embedding`` has B. Triton's ensemble scheduler forwards a step's outputs whatever their batch
size; B x N is bounded by every downstream model's ``max_batch_size`` (checked per request).

Seeds. Caption b's seed (``seed``; absent: ``default_seed + b``, as ``diffgap generate`` without
``--seed``) gives its bridge noise
(:func:`diffgap.core.generation.generation_noise`: row j of ``default_rng(seed).standard_normal((N, D))``)
and the generator's latent seed of sample j (:func:`diffgap.core.generation.latent_seed`): the same
rules ``diffgap generate`` uses, so a served waveform equals the in-process one for the same caption
and seed.

The generator model is a file template outside this package (:mod:`diffgap.triton_generator`): it
needs torch and diffusers, and ``diffgap.triton_models`` stays torch-free (import-linter contract).
This module only reads that file's text and names the generator folder in the model's parameters
(the Triton Stable Diffusion example's pattern: the python model loads a local pipeline folder).
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_dir, atomic_write_json
from diffgap.core.iospec import ROLE_CONDITION, ROLE_NOISE, ROLE_RAW_SAMPLE, triton_dtype
from diffgap.core.manifest import Manifest
from diffgap.core.names import (
    GENERATOR_TEXT_ENCODER, GENERATOR_TOKENIZER_ASSET, condition_ensemble_name, condition_sampler_name,
)

from . import repository as R

log = logging.getLogger(__name__)

# -- model names (export names come from diffgap.core.names) ----------------------------------------
GENERATOR_TOKENIZER = "generator_tokenizer"
GENERATOR = "audio_generator"
SOURCE, TARGET = "text", "audio"


def condition_noise_name(source: str = SOURCE, target: str = TARGET) -> str:
    """Python model drawing the condition sampler's N seeded samples per caption."""
    return f"{condition_sampler_name(source, target)}_noise"


def waveform_ensemble_name(source: str = SOURCE, target: str = TARGET) -> str:
    """Ensemble: ``source`` -> condition samples -> the generator's waveforms."""
    return f"{source}_to_{target}_waveform"


# -- the ensembles' client-facing tensors (the only names declared here; TEXT, SEED and the text
#    embedding's name are the retrieval repository's) ------------------------------------------------
SAMPLES = "samples"            # (B, 1) TYPE_INT64, optional: samples per caption (one value per request)
CONDITION = "condition"        # (B*N, E) TYPE_FP32: raw-space condition samples, row b*N + j
LATENT_SEED = "latent_seed"    # (B*N, 1) TYPE_INT64: the generator's latent seed of each row
WAVEFORM = "waveform"          # (B*N, L) TYPE_FP32: the generator's waveform of each row
TEXT_EMBEDDING = R.OUTPUTS["clap"]  # (B, E): the caption's CLAP text embedding

# One generator call per request row is the cost that matters (a UNet run per step); a small batch
# bound keeps one request from holding the model for minutes. Editable per repository.
GENERATOR_MAX_BATCH = 16
MAX_SAMPLES = 16


@dataclass
class GenerationOptions:
    samples: int = 1                          # default N when a request sends no ``samples``
    max_samples: int = MAX_SAMPLES            # the largest N a request may ask for
    generator: str | Path | None = None       # local diffusers AudioLDM/MusicLDM folder -> audio_generator
    generator_max_batch: int = GENERATOR_MAX_BATCH
    num_inference_steps: int | None = None    # the generator's steps (None: the pipeline's default)
    audio_length_in_s: float | None = None    # None: the pipeline's default
    generator_guidance: float | None = None   # the generator's guidance scale (None: the pipeline's default)
    device: str | None = None                 # torch device of the generator (None: cpu portable, cuda gpu)
    any_clap: bool = False                    # skip the generator-CLAP fingerprint check at load
    repo: R.RepoOptions = field(default_factory=R.RepoOptions)

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= self.max_samples:
            raise UserError(f"samples must be in [1, {self.max_samples}], got {self.samples}")
        if self.generator_max_batch < 1:
            raise UserError(f"generator_max_batch must be >= 1, got {self.generator_max_batch}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise UserError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.audio_length_in_s is not None and self.audio_length_in_s <= 0:
            raise UserError(f"audio_length_in_s must be > 0, got {self.audio_length_in_s}")
        if self.generator is not None:
            g = Path(self.generator)
            if not (g / "model_index.json").is_file():
                raise UserError(
                    f"generator folder {g} has no model_index.json; pass a local diffusers AudioLDM/MusicLDM folder "
                    "(save_pretrained layout)"
                )


def _generation_template() -> str:
    return resources.files("diffgap.triton_models").joinpath("generation_model.py").read_text()


def _generator_template() -> str:
    # Read as text, never imported: the template imports torch and diffusers (find_spec imports only
    # the parent package, diffgap, which is torch-free).
    spec = importlib.util.find_spec("diffgap.triton_generator")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("diffgap.triton_generator (the generator's python-model template) is missing; reinstall diffgap")
    return Path(spec.origin).read_text()


class _GenerationPlanner(R._Planner):
    """The retrieval planner's python / exported-graph configs, for the generation models."""

    def __init__(self, man: Manifest, opts: GenerationOptions) -> None:  # noqa: D107 - no family detection here
        self.man, self.opts, self.gen = man, opts.repo, opts
        self.models: dict[str, R.ModelDir] = {}
        self.outputs = R.OUTPUTS
        for name in (GENERATOR_TEXT_ENCODER, condition_sampler_name(SOURCE, TARGET)):
            if name not in man.models:
                raise UserError(
                    f"export {man.root} has no {name}; the generation repository needs "
                    + ("the generator's CLAP text tower: re-export with `diffgap export CKPT --generation --generator GENERATOR_DIR`"
                       if name == GENERATOR_TEXT_ENCODER else "the generation sampler: re-export with `diffgap export CKPT --generation`")
                )
        self.sampler = man.model(condition_sampler_name(SOURCE, TARGET)).io
        self.text = man.model(GENERATOR_TEXT_ENCODER).io
        for role in (ROLE_CONDITION, ROLE_NOISE, ROLE_RAW_SAMPLE):
            self.sampler.role(role)
        widths = (self.text.outputs[0].feature_shape, self.sampler.role(ROLE_CONDITION).feature_shape)
        if widths[0] != widths[1]:
            raise UserError(f"export {man.root}: the generator's text tower emits {widths[0]} but the generation sampler takes "
                            f"{widths[1]}; export a checkpoint trained on this generator's CLAP")

    # -- composing models ------------------------------------------------------------------
    def generator_tokenizer(self) -> R.ModelDir:
        asset = self.man.asset(GENERATOR_TOKENIZER_ASSET)
        files: dict[str, Path | str] = {asset.name: asset}
        cfg_key = f"{GENERATOR_TOKENIZER_ASSET}_config"
        if cfg_key in self.man.assets:
            files[self.man.asset(cfg_key).name] = self.man.asset(cfg_key)
        kind = self.text.meta.get("tokenizer")
        return self._python(
            GENERATOR_TOKENIZER, self.text, [R.string_tensor(R.TEXT, [1])],
            [R.tensor_config(t, optional=False) for t in self.text.inputs], self.text.max_batch, "tokenizer",
            files=files, tokenizer=kind, tokenizer_asset=asset.name, text_input=R.TEXT, max_text_bytes=self.opts.max_text_bytes,
        )

    def row_limit(self) -> int:
        """The most rows (B x N) one request may put through the sampler (and the generator)."""
        limit = self.sampler.max_batch
        if self.gen.generator is not None:
            limit = min(limit, self.gen.generator_max_batch)
        return limit

    def condition_noise(self) -> R.ModelDir:
        smp = self.sampler
        cond, nz = smp.role(ROLE_CONDITION), smp.role(ROLE_NOISE)
        optional = [t for t in smp.inputs if t.optional]
        int64 = R.Enum(triton_dtype("int64"))
        inputs = [R.tensor_config(cond), R.seed_tensor(), {"name": SAMPLES, "data_type": int64, "dims": [1], "optional": True},
                  *(R.tensor_config(t) for t in optional)]
        outputs = [R.tensor_config(cond, optional=False), R.tensor_config(nz),
                   *(R.tensor_config(t, optional=False) for t in optional),
                   {"name": LATENT_SEED, "data_type": int64, "dims": [1]}]
        max_batch = min(self.text.max_batch, self.row_limit())
        return self._python(
            condition_noise_name(), smp, inputs, outputs, max_batch, "condition_noise",
            files={"model.py": _generation_template()},
            default_seed=self.opts.default_seed, seed_input=R.SEED, samples_input=SAMPLES, default_samples=self.gen.samples,
            max_samples=self.gen.max_samples, max_rows=self.row_limit(), condition=cond.name, noise=nz.name,
            latent_seed=LATENT_SEED,
        )

    def generator(self) -> R.ModelDir:
        g, raw = self.gen, self.sampler.role(ROLE_RAW_SAMPLE)
        gpu = self.opts.flavor == "gpu"
        device = g.device or ("cuda" if gpu else "cpu")
        fingerprint = (self.sampler.meta.get("encoder") or {}).get("fingerprint") or ""
        cfg = {
            "name": GENERATOR, "backend": "python", "max_batch_size": g.generator_max_batch,
            "input": [R.tensor_config(raw, CONDITION), {"name": LATENT_SEED, "data_type": R.Enum(triton_dtype("int64")), "dims": [1]}],
            "output": [{"name": WAVEFORM, "data_type": R.Enum(triton_dtype("float32")), "dims": [-1]}],
            "instance_group": [{"count": self.opts.instances, "kind": R.Enum("KIND_GPU" if device.startswith("cuda") else "KIND_CPU")}],
            "dynamic_batching": {"max_queue_delay_microseconds": self.opts.queue_delay(gpu=gpu)},
            "parameters": R.parameters(
                generator_dir=str(Path(g.generator).resolve()), device=device,
                num_inference_steps="" if g.num_inference_steps is None else g.num_inference_steps,
                audio_length_in_s="" if g.audio_length_in_s is None else g.audio_length_in_s,
                guidance_scale="" if g.generator_guidance is None else g.generator_guidance,
                clap_fingerprint=fingerprint, any_clap=int(g.any_clap),
                condition_input=CONDITION, latent_seed_input=LATENT_SEED, waveform_output=WAVEFORM,
            ),
        }
        return R.ModelDir(GENERATOR, cfg, {"model.py": _generator_template()})

    # -- ensembles -------------------------------------------------------------------------
    def _condition_steps(self) -> tuple[list, list, list]:
        """(inputs, steps, outputs) of caption -> condition samples."""
        smp, enc = self.sampler, self.text
        cond, nz, raw = smp.role(ROLE_CONDITION), smp.role(ROLE_NOISE), smp.role(ROLE_RAW_SAMPLE)
        optional = [t for t in smp.inputs if t.optional]
        noise_model, smp_name = condition_noise_name(), condition_sampler_name(SOURCE, TARGET)
        tok = {t.name: f"{GENERATOR_TOKENIZER}.{t.name}" for t in enc.inputs}
        rows = {t.name: f"{noise_model}.{t.name}" for t in (cond, nz, *optional)}
        steps = [
            R.ensemble_step(GENERATOR_TOKENIZER, {R.TEXT: R.TEXT}, tok),
            R.ensemble_step(GENERATOR_TEXT_ENCODER, tok, {enc.outputs[0].name: TEXT_EMBEDDING}),
            R.ensemble_step(noise_model, {cond.name: TEXT_EMBEDDING, R.SEED: R.SEED, SAMPLES: SAMPLES,
                                          **{t.name: t.name for t in optional}}, {**rows, LATENT_SEED: LATENT_SEED}),
            R.ensemble_step(smp_name, rows, {raw.name: CONDITION}),
        ]
        int64 = R.Enum(triton_dtype("int64"))
        inputs = [R.string_tensor(R.TEXT, [1]), R.seed_tensor(), {"name": SAMPLES, "data_type": int64, "dims": [1], "optional": True},
                  *(R.tensor_config(t) for t in optional)]
        outputs = [R.tensor_config(enc.outputs[0], TEXT_EMBEDDING), R.tensor_config(raw, CONDITION),
                   {"name": LATENT_SEED, "data_type": int64, "dims": [1]}]
        return inputs, steps, outputs

    def _ensemble(self, name: str, inputs: list, steps: list, outputs: list) -> R.ModelDir:
        composing = [s["model_name"] for s in steps]
        cfg = {"name": name, "platform": "ensemble", "max_batch_size": self._max_batch(composing),
               "input": inputs, "output": outputs, "ensemble_scheduling": {"step": steps}}
        return R.ModelDir(name, cfg, {})

    def plan(self) -> dict[str, R.ModelDir]:
        composing = [self.generator_tokenizer(), self.exported(GENERATOR_TEXT_ENCODER), self.condition_noise(),
                     self.exported(condition_sampler_name(SOURCE, TARGET))]
        if self.gen.generator is not None:
            composing.append(self.generator())
        self.models.update((md.name, md) for md in composing)
        inputs, steps, outputs = self._condition_steps()
        # An ensemble's max_batch_size may not exceed any composing model's (Triton refuses the config);
        # rows fan out at the noise step, which refuses requests whose B x N exceeds row_limit().
        ens = [self._ensemble(condition_ensemble_name(SOURCE, TARGET), inputs, steps, outputs)]
        if self.gen.generator is not None:
            wav_steps = [*steps, R.ensemble_step(GENERATOR, {CONDITION: CONDITION, LATENT_SEED: LATENT_SEED}, {WAVEFORM: WAVEFORM})]
            wav_out = [*outputs, {"name": WAVEFORM, "data_type": R.Enum(triton_dtype("float32")), "dims": [-1]}]
            ens.append(self._ensemble(waveform_ensemble_name(), inputs, wav_steps, wav_out))
        self.models.update((md.name, md) for md in ens)
        return self.models


def _options(options: dict[str, Any]) -> GenerationOptions:
    repo_keys = set(R.RepoOptions.__dataclass_fields__)
    repo = R.RepoOptions(**{k: v for k, v in options.items() if k in repo_keys})
    return GenerationOptions(**{k: v for k, v in options.items() if k not in repo_keys}, repo=repo)


def plan_generation_repository(export_dir: str | Path | Manifest, **options: Any) -> dict[str, R.ModelDir]:
    """What :func:`build_generation_repository` would write, without writing."""
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir, verify=True)
    return _GenerationPlanner(man, _options(options)).plan()


def build_generation_repository(export_dir: str | Path, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
    """Write the generation repository of ``export_dir`` to ``out`` (atomically); return ``out``.

    ``options``: the retrieval repository's (:class:`~diffgap.triton_models.repository.RepoOptions`:
    ``flavor``, ``gpu_platform``, ``precision``, ``default_seed`` ...) and :class:`GenerationOptions`
    (``samples``, ``generator``, ``num_inference_steps`` ...).
    """
    man = Manifest.load(export_dir, verify=True)
    opts = _options(options)
    models = _GenerationPlanner(man, opts).plan()
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for md in models.values():
            d = tmp / md.name
            (d / "1").mkdir(parents=True)
            (d / "config.pbtxt").write_text(R.config_text(md.config))
            for dest, src in md.files.items():
                if isinstance(src, Path):
                    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, d / "1" / dest)
                else:
                    (d / "1" / dest).write_text(src)
        r = opts.repo
        atomic_write_json(tmp / R.REPO_INFO, {
            "format": R.REPO_FORMAT, "kind": "generation", "flavor": r.flavor,
            "gpu_platform": r.gpu_platform if r.flavor == "gpu" else None,
            "precision": r.precision if r.flavor == "gpu" else "fp32",
            "export_dir": str(man.root.resolve()), "preset": man.preset, "checkpoint_sha256": man.checkpoint_sha256,
            "package_version": man.package_version, "default_seed": r.default_seed, "default_samples": opts.samples,
            "generator": str(Path(opts.generator).resolve()) if opts.generator is not None else None,
            "models": sorted(models),
        })
    log.info("wrote %s Triton generation repository %s (%d models)", r.flavor, out, len(models))
    return out
