"""Generate a Triton model repository from a diffgap export directory.

Triton's own layout (``<model>/config.pbtxt``, ``<model>/1/model.*``). Models:

==============================  =================================================================
``clap_tokenizer``              python: ``TYPE_STRING`` captions -> the text encoder's token feeds
``clap_text_encoder``           exported graph (python+ORT CPU | ``tensorrt_plan`` | ``onnxruntime_onnx``)
``clap_audio_encoder``          exported graph
``diffgap_text_to_audio``       fused sampler (exported graph)
``diffgap_audio_to_text``       fused sampler (exported graph)
``diffgap_<dir>_noise``         python: sampler noise from an optional per-row seed (fixed default)
``audio_gallery_search``        python: top-k fused scores from the shipped gallery index's search engine
``text_to_audio_embedding``     ensemble: tokenizer -> text encoder -> noise -> sampler
``audio_to_text_embedding``     ensemble: audio encoder -> noise -> sampler
``text_to_audio_search``        ensemble: ... -> sampler -> gallery search (ids, scores)
==============================  =================================================================

That is the repository of a text<->audio (CLAP-space) export. A video<->audio (CAVP-space) export gives
``cavp_video_encoder``, ``cavp_audio_encoder``, ``diffgap_video_to_audio``, ``diffgap_audio_to_video``,
their ``diffgap_<dir>_noise`` models and the ensembles ``video_to_audio_embedding`` (frames -> video
encoder -> noise -> sampler) and ``audio_to_video_embedding``; no tokenizer and no gallery search.
Which family a repository gets is read from the manifest's models (:func:`encoder_family`).

Every tensor name, dtype and dim of every ``config.pbtxt`` is read from the IOSpec in the export's
``manifest.json``. The only names declared here are the ensembles' own client-facing tensors
(:data:`TEXT`, :data:`SEED`, :data:`OUTPUTS`, :data:`SEARCH_IDS`, :data:`SEARCH_SCORES`) -- tensors
no exported module has -- each written once, below.

Flavours (both from the same declarations):

- ``portable``: every model is a python-backend model (:mod:`diffgap.triton_models.python_model`);
  the exported graphs run on onnxruntime CPU through ``diffgap.runtime``. Serves on the bundled
  tritonserver of nvidia-pytriton, on any CPU box.
- ``gpu``: the exported graphs as ``tensorrt_plan`` engines (built by ``diffgap build-engines`` on the
  serving GPU; copied from the engine cache), ``KIND_GPU``, dynamic batching with preferred sizes, and
  CUDA graphs for the preferred batch sizes (every non-batch dim is static, so each batch size is one
  graph). An engine deserialises only in the TensorRT release that built it, so each engine's
  recorded TensorRT version is checked against ``server_trt_version`` (the serving tritonserver's;
  ``--server-trt-version``) and a mismatch is refused. ``--gpu-platform onnxruntime_onnx`` is the
  alternative when engines cannot be built in the serving release: the ONNX graphs with
  onnxruntime's TensorRT accelerator, set up as ``open_model(..., backend="ort-trt")`` does (FP16/INT8
  off so the FP16 graph keeps its own types, the IOSpec's profile shapes, an engine cache). The
  tokenizer, noise and search models stay python models on CPU in both.

Every ``config.pbtxt`` is a ``ModelConfig`` message of Triton's own protobuf, printed in text format
(:mod:`diffgap.triton_models.pbtxt`), composed from the pieces in :mod:`diffgap.triton_models.model_config`.
:class:`_Planner` composes the models (composing models first: the ensembles are wired from their
configs); :func:`build_repository` writes them.

Written atomically (:func:`diffgap.core.fsutil.atomic_dir`): a failed generation leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_dir, atomic_write_json
from diffgap.core.iospec import IOSpec, triton_dtype
from diffgap.core.manifest import Manifest
from diffgap.core.names import PRECISIONS, embedding_ensemble_name, encoder_name, head_name, noise_model_name, sampler_name
# The sampler tensors' roles (keys of the IOSpec's meta["roles"]): tensors are looked up by role in
# the manifest's IOSpec (IOSpec.role), never by a retyped name.
from diffgap.runtime.pipeline import (
    DEFAULT_SEED, SAMPLER_BRIDGED, SAMPLER_CONDITION, SAMPLER_NOISE, SAMPLER_PROJECTED,
)

from .model_config import (  # noqa: F401  (the config helpers every model of the repository uses)
    ensemble_step, gpu_graph_config, parameters, preferred_sizes, string_tensor, tensor_config,
)
from .pbtxt import Enum, config_text, model_config  # noqa: F401

log = logging.getLogger(__name__)

_step = ensemble_step
# Earlier name of config_text (a dict or ModelConfig -> config.pbtxt text).
to_pbtxt = config_text

FLAVORS = ("portable", "gpu")
GPU_PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx")
REPO_FORMAT = "diffgap-triton-repo/1"
REPO_INFO = "diffgap_repository.json"

# -- model names (export and ensemble names come from diffgap.core.names) --------------------------
TOKENIZER = "clap_tokenizer"
SEARCH = "audio_gallery_search"
DIRECTIONS = (("text", "audio"), ("audio", "text"))
# encoder family -> its (source, target) directions; the first direction's source is the non-audio
# modality. The family's export names are <family>_<modality>_encoder.
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "clap": DIRECTIONS,
    "cavp": (("video", "audio"), ("audio", "video")),
}


noise_name = noise_model_name
embedding_ensemble = embedding_ensemble_name
SEARCH_ENSEMBLE = "text_to_audio_search"

# -- the ensembles' client-facing tensors (the only names declared here) ---------------------------
TEXT = "text"                      # (B, 1) TYPE_STRING, one UTF-8 caption per row
SEED = "seed"                      # (B, 1) TYPE_INT64, optional: per-row sampler seed
# role -> ensemble output name, mirroring diffgap.runtime.BridgeResult (source, projected, bridged);
# role "clap" is the source encoder's embedding, named after the family in CAVP repositories.
OUTPUTS = {"clap": "clap_embedding", "projected": "projected_embedding", "bridged": "bridged_embedding"}
FAMILY_OUTPUTS: dict[str, dict[str, str]] = {
    "clap": OUTPUTS,
    "cavp": {**OUTPUTS, "clap": "cavp_embedding"},
}
SEARCH_IDS = "ids"                 # (B, k) TYPE_STRING gallery ids, best first
SEARCH_SCORES = "scores"           # (B, k) TYPE_FP32 fused scores

# CLAP reads 77 tokens; a caption is a sentence. 2 KiB bounds the tokenizer's work per row and
# rejects pasted documents with a clear error instead of silently truncating them.
MAX_TEXT_BYTES = 2048
# Dynamic batching window. Portable (CPU): no wait. A model busy with one call still gathers every
# request that queued meanwhile into the next one, so concurrent clients share calls anyway; a window
# only delays a lone request, once per ensemble step (``python -m benchmarks --only triton`` reruns
# the ensembles with a window when the batching goal is missed: the batching-knob tables in
# benchmarks/results). GPU: 100 us, small next to one engine call, lets batches fill.
PORTABLE_QUEUE_DELAY_US = 0
GPU_QUEUE_DELAY_US = 100
# onnxruntime_onnx models: the existing folder, inside the server, under which each model's TensorRT
# accelerator caches in its own flat folder (diffgap.runtime.ort_trt.ort_trt_cache_folder).
ORT_TRT_CACHE_DIR = "/tmp"


# ------------------------------------------------------------------------------------------------
# config helpers (config.pbtxt is written through Triton's ModelConfig protobuf: pbtxt.py)
# ------------------------------------------------------------------------------------------------
def seed_tensor(optional: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"name": SEED, "data_type": Enum(triton_dtype("int64")), "dims": [1]}
    if optional:
        d["optional"] = True
    return d



# ------------------------------------------------------------------------------------------------
# the plan: what goes into the repository
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelDir:
    """One ``<model>/`` directory: its config and the files of version 1 (dest name -> source or text)."""

    name: str
    config: dict[str, Any]
    files: dict[str, Path | str] = field(default_factory=dict)


@dataclass
class RepoOptions:
    flavor: str = "portable"
    gpu_platform: str = "tensorrt_plan"
    precision: str = "fp16"            # the gpu flavour's graphs (portable always runs fp32 on CPU)
    engine_dir: str | Path | None = None
    index: str | Path | None = None     # gallery index (diffgap index) -> text_to_audio_search
    top_k: int = 10
    default_seed: int = DEFAULT_SEED
    instances: int = 1
    intra_op_threads: int = 0           # ORT intra-op threads per model instance; 0 = ORT's default (one per core)
    max_text_bytes: int = MAX_TEXT_BYTES
    queue_delay_us: int | None = None   # dynamic batching window; None = the flavour's default
    # gpu flavour, tensorrt_plan: the serving tritonserver's TensorRT release (its engines must match)
    server_trt_version: str | None = None
    # gpu flavour, onnxruntime_onnx: the existing folder, inside the server, under which the TensorRT
    # accelerator caches each model's engines and timing cache in one flat folder of its own
    # (onnxruntime creates only that last level; it must be writable by the server process)
    ort_trt_cache_dir: str = ORT_TRT_CACHE_DIR

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown flavour {self.flavor!r}; use one of {', '.join(FLAVORS)}")
        if self.gpu_platform not in GPU_PLATFORMS:
            raise ValueError(f"unknown gpu platform {self.gpu_platform!r}; use one of {', '.join(GPU_PLATFORMS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.default_seed < 0:
            raise ValueError(f"--default-seed must be >= 0, got {self.default_seed}")
        if self.instances < 1:
            raise ValueError(f"--instances must be >= 1, got {self.instances}")
        if self.intra_op_threads < 0:
            raise ValueError(f"--intra-op-threads must be >= 0 (0 = one per core), got {self.intra_op_threads}")
        if self.queue_delay_us is not None and self.queue_delay_us < 0:
            raise ValueError(f"queue delay must be >= 0 microseconds, got {self.queue_delay_us}")
        if self.flavor == "gpu" and self.gpu_platform == "tensorrt_plan":
            from diffgap.runtime.trt_host import server_trt_release

            server_trt_release(self.server_trt_version)  # required, and a version: checked before any work

    def queue_delay(self, gpu: bool) -> int:
        if self.queue_delay_us is not None:
            return int(self.queue_delay_us)
        return GPU_QUEUE_DELAY_US if gpu else PORTABLE_QUEUE_DELAY_US


def _template() -> str:
    return resources.files("diffgap.triton_models").joinpath("python_model.py").read_text()


def encoder_family(man: Manifest) -> str:
    """``"clap"`` or ``"cavp"``: the family whose encoders *and* both samplers the export holds."""
    found = []
    for family, dirs in FAMILIES.items():
        names = [sampler_name(s, t) for s, t in dirs] + [encoder_name(m, family) for m in dirs[0]]
        if all(n in man.models for n in names):
            found.append(family)
    if len(found) != 1:
        raise ValueError(
            f"export {man.root} holds models {sorted(man.models)}: a Triton repository needs the encoders and both "
            "samplers of exactly one family (clap: text<->audio, cavp: video<->audio); re-export with `diffgap export` "
            "without --encoders none"
        )
    return found[0]


def _sampler_roles(io: IOSpec) -> None:
    """Fail early, with a "re-export" message, when the sampler's IOSpec lacks a required role."""
    for role in (SAMPLER_CONDITION, SAMPLER_NOISE, SAMPLER_BRIDGED, SAMPLER_PROJECTED):
        io.role(role)


class _Planner:
    def __init__(self, man: Manifest, opts: RepoOptions) -> None:
        self.man, self.opts = man, opts
        self.models: dict[str, ModelDir] = {}
        self.family = encoder_family(man)
        self.outputs = FAMILY_OUTPUTS[self.family]
        if opts.index is not None and self.family != "clap":
            raise ValueError(f"--index builds the text->audio search; this {self.family} export bridges video<->audio: drop --index")

    # -- composing models ------------------------------------------------------------------
    def io(self, name: str) -> IOSpec:
        return self.man.model(name).io

    def _python(self, name: str, io: IOSpec, inputs: list, outputs: list, max_batch: int, role: str,
                files: dict[str, Path | str] | None = None, **params: Any) -> ModelDir:
        cfg = {
            "name": name,
            "backend": "python",
            "max_batch_size": max_batch,
            "input": inputs,
            "output": outputs,
            "instance_group": [{"count": self.opts.instances, "kind": Enum("KIND_CPU")}],
            "dynamic_batching": {
                "preferred_batch_size": preferred_sizes(io, max_batch),
                "max_queue_delay_microseconds": self.opts.queue_delay(gpu=False),
            },
            "parameters": parameters(diffgap_role=role, **params),
        }
        f: dict[str, Path | str] = {"model.py": _template(), "io.json": json.dumps(io.to_dict(), indent=2, sort_keys=True)}
        f.update(files or {})
        return ModelDir(name, cfg, f)

    def exported(self, name: str) -> ModelDir:
        io = self.io(name)
        o = self.opts
        if o.flavor == "portable":
            return self._python(
                name, io, [tensor_config(t) for t in io.inputs], [tensor_config(t) for t in io.outputs],
                io.max_batch, "onnx", files={"model.onnx": self.man.path(name, "fp32")},
                intra_op_threads=o.intra_op_threads,
            )
        cfg = gpu_graph_config(
            name, io, o.gpu_platform, instances=o.instances, queue_delay_us=o.queue_delay(gpu=True),
            ort_trt_cache_dir=o.ort_trt_cache_dir,
        )
        if o.gpu_platform == "onnxruntime_onnx":
            return ModelDir(name, cfg, {"model.onnx": self.man.path(name, o.precision)})
        return ModelDir(name, cfg, {"model.plan": self.engine(name)})

    def engine(self, name: str) -> Path:
        """The cached TensorRT engine of ``name``, checked against the serving tritonserver's release."""
        from diffgap.runtime.engine import EngineMeta, check_server_trt, find_engine

        try:
            plan = find_engine(self.man, name, self.opts.precision, engine_dir=self.opts.engine_dir)
        except ImportError as e:
            # Engines are keyed by the GPU and TensorRT version they were built with, so they can
            # only be looked up (and served) on the GPU host itself.
            raise FileNotFoundError(
                f"cannot look up TensorRT engines here ({e}); on the serving GPU host run "
                f"`diffgap build-engines {self.man.root}` and then this command, or pass "
                "--gpu-platform onnxruntime_onnx"
            ) from e
        check_server_trt(EngineMeta.read(plan).trt_version, self.opts.server_trt_version, f"engine {plan}")
        return plan

    def tokenizer(self) -> ModelDir:
        enc = self.io(encoder_name("text"))
        kind = enc.meta.get("tokenizer")
        if not kind:
            raise ValueError(f"{enc.name} declares no tokenizer in its I/O metadata; re-export with `diffgap export`")
        asset = self.man.asset("tokenizer")
        return self._python(
            TOKENIZER, enc, [string_tensor(TEXT, [1])], [tensor_config(t, optional=False) for t in enc.inputs],
            enc.max_batch, "tokenizer", files={asset.name: asset},
            tokenizer=kind, tokenizer_asset=asset.name, text_input=TEXT, max_text_bytes=self.opts.max_text_bytes,
        )

    def noise(self, source: str, target: str) -> ModelDir:
        io = self.io(sampler_name(source, target))
        _sampler_roles(io)
        cond, nz = io.role(SAMPLER_CONDITION), io.role(SAMPLER_NOISE)
        optional = [t for t in io.inputs if t.optional]
        return self._python(
            noise_name(source, target), io,
            [tensor_config(cond), seed_tensor(), *(tensor_config(t) for t in optional)],
            [tensor_config(nz), *(tensor_config(t, optional=False) for t in optional)],
            io.max_batch, "noise",
            default_seed=self.opts.default_seed, seed_input=SEED, condition=cond.name, noise=nz.name,
        )

    def search(self, index_path: Path) -> ModelDir:
        """The gallery search: the index directory ships as ``1/index``; its engine serves the queries.
        Model parameters: ``milvus_uri`` (a ``milvus`` index: empty = the URI recorded at build time,
        or its embedded Milvus Lite file) and the per-query knobs ``ef_search`` / ``nprobe`` /
        ``refine`` (empty = the index's defaults); edit them in config.pbtxt to retarget a deployment."""
        from diffgap.runtime.fusion import fusion_weights
        from diffgap.runtime.search_engines import KNOBS

        io = self.io(sampler_name("text", "audio"))
        enc = self.io(encoder_name("text"))
        index = self.gallery(index_path, io)
        n = index.count
        k = min(self.opts.top_k, n)
        if k < self.opts.top_k:
            log.warning("top-k %d > gallery size %d; serving k=%d", self.opts.top_k, n, k)
        specs = {"clap": enc.outputs[0], "projected": io.role(SAMPLER_PROJECTED), "bridged": io.role(SAMPLER_BRIDGED)}
        roles = self._search_roles()  # only the query embeddings a weighted term reads
        tensors = {**{r: OUTPUTS[r] for r in roles}, "ids": SEARCH_IDS, "scores": SEARCH_SCORES}
        engine = index.engine["name"]
        spec = {"k": k, "weights": fusion_weights(self.man), "tensors": tensors, "gallery_size": n, "engine": engine}
        uri = index.meta["sides"]["audio"].get("engine_params", {}).get("uri", "") if engine == "milvus" else ""
        md = self._python(
            SEARCH, io,
            [tensor_config(specs[r], OUTPUTS[r]) for r in roles],
            [string_tensor(SEARCH_IDS, [k]), {"name": SEARCH_SCORES, "data_type": Enum(triton_dtype("float32")), "dims": [k]}],
            io.max_batch, "search", files={"index": Path(index_path), "search.json": json.dumps(spec, indent=2, sort_keys=True)},
            milvus_uri=uri, **{knob: "" for knob in KNOBS},
        )
        md.files["io.json"] = json.dumps(io.to_dict(), indent=2, sort_keys=True)
        return md

    def gallery(self, index_path: Path, sampler: IOSpec) -> "GalleryIndex":
        """The gallery index, checked against this export and against the sampler's default guidance."""
        from diffgap.runtime.gallery import GalleryIndex

        index = GalleryIndex.load(index_path)
        index.check_model(self.man, sampler.role(SAMPLER_NOISE).feature_shape[0])
        gs = index.meta.get("guidance_scale")
        if gs is not None:
            raise ValueError(
                f"index {index_path} was built with guidance_scale={gs}; the repository's sampler runs its declared "
                "default, so rebuild the index without --guidance-scale"
            )
        return index

    # -- ensembles -------------------------------------------------------------------------
    def _max_batch(self, names: Iterable[str]) -> int:
        return min(int(self.models[n].config["max_batch_size"]) for n in names)

    def _front(self, source: str, target: str) -> tuple[list, list, dict[str, str], list[str]]:
        """Steps source input -> encoder -> noise -> sampler; returns (inputs, steps, role -> tensor, models)."""
        enc_name, smp_name, nz_name = encoder_name(source, self.family), sampler_name(source, target), noise_name(source, target)
        enc, smp = self.io(enc_name), self.io(smp_name)
        out = self.outputs  # the family's ensemble output names
        steps: list[dict[str, Any]] = []
        models = [enc_name, nz_name, smp_name]
        if source == "text":
            inputs = [string_tensor(TEXT, [1])]
            tok = {t.name: f"{TOKENIZER}.{t.name}" for t in enc.inputs}
            steps.append(_step(TOKENIZER, {TEXT: TEXT}, tok))
            steps.append(_step(enc_name, tok, {enc.outputs[0].name: out["clap"]}))
            models.insert(0, TOKENIZER)
        else:
            inputs = [tensor_config(t) for t in enc.inputs]
            steps.append(_step(enc_name, {t.name: t.name for t in enc.inputs}, {enc.outputs[0].name: out["clap"]}))
        _sampler_roles(smp)
        cond, bridged, projected = smp.role(SAMPLER_CONDITION), smp.role(SAMPLER_BRIDGED), smp.role(SAMPLER_PROJECTED)
        optional = [t for t in smp.inputs if t.optional]
        inputs.append(seed_tensor())
        inputs += [tensor_config(t) for t in optional]
        nz_out = {t.name: f"{nz_name}.{t.name}" for t in (smp.role(SAMPLER_NOISE), *optional)}
        steps.append(_step(nz_name, {cond.name: out["clap"], SEED: SEED, **{t.name: t.name for t in optional}}, nz_out))
        steps.append(_step(
            smp_name, {cond.name: out["clap"], **nz_out},
            {bridged.name: out["bridged"], projected.name: out["projected"]},
        ))
        return inputs, steps, {"clap": enc.outputs[0], "projected": projected, "bridged": bridged}, models

    def embedding_ensemble(self, source: str, target: str) -> ModelDir:
        inputs, steps, specs, models = self._front(source, target)
        name = embedding_ensemble(source, target)
        cfg = {
            "name": name, "platform": "ensemble", "max_batch_size": self._max_batch(models),
            "input": inputs,
            "output": [tensor_config(specs[r], self.outputs[r]) for r in ("clap", "projected", "bridged")],
            "ensemble_scheduling": {"step": steps},
        }
        return ModelDir(name, cfg, {})

    def _search_roles(self) -> list[str]:
        """The query embeddings the search reads (``clap``, ``projected``, ``bridged``): those of the
        export's text -> audio fusion terms of non-zero weight."""
        from diffgap.runtime.fusion import fusion_weights, query_needs

        needs = query_needs(fusion_weights(self.man))
        return [r for r, field in (("clap", "source"), ("projected", "projected"), ("bridged", "bridged")) if field in needs]

    def _search_skips_sampler(self) -> bool:
        """No query-side bridged term (weight 0) and the text head exported: the search ensemble runs the
        head in place of the noise model and the sampler."""
        return "bridged" not in self._search_roles() and head_name("text") in self.man.models

    def _front_head(self) -> tuple[list, list, dict[str, str], list[str]]:
        """Steps text -> tokenizer -> encoder -> the text head alone (no noise, no sampler)."""
        enc_name, hd_name = encoder_name("text", self.family), head_name("text")
        enc, hd = self.io(enc_name), self.io(hd_name)
        tok = {t.name: f"{TOKENIZER}.{t.name}" for t in enc.inputs}
        steps = [_step(TOKENIZER, {TEXT: TEXT}, tok), _step(enc_name, tok, {enc.outputs[0].name: self.outputs["clap"]}),
                 _step(hd_name, {hd.role(SAMPLER_CONDITION).name: self.outputs["clap"]},
                       {hd.role(SAMPLER_PROJECTED).name: self.outputs["projected"]})]
        return [string_tensor(TEXT, [1])], steps, {}, [TOKENIZER, enc_name, hd_name]

    def search_ensemble(self) -> ModelDir:
        if self._search_skips_sampler():
            inputs, steps, _, models = self._front_head()
            roles = self._search_roles()
            steps.append(_step(SEARCH, {OUTPUTS[r]: OUTPUTS[r] for r in roles}, {SEARCH_IDS: SEARCH_IDS, SEARCH_SCORES: SEARCH_SCORES}))
            cfg = {
                "name": SEARCH_ENSEMBLE, "platform": "ensemble", "max_batch_size": self._max_batch([*models, SEARCH]),
                "input": inputs, "output": self.models[SEARCH].config["output"], "ensemble_scheduling": {"step": steps},
            }
            return ModelDir(SEARCH_ENSEMBLE, cfg, {})
        inputs, steps, specs, models = self._front("text", "audio")
        # The index was built with the sampler's default guidance: the search exposes no guidance input.
        opt = {t.name for t in self.io(sampler_name("text", "audio")).inputs if t.optional}
        inputs = [i for i in inputs if i["name"] not in opt]
        for s in steps:
            s["input_map"] = [m for m in s["input_map"] if m["value"] not in opt]
        steps.append(_step(SEARCH, {OUTPUTS[r]: OUTPUTS[r] for r in self._search_roles()},
                           {SEARCH_IDS: SEARCH_IDS, SEARCH_SCORES: SEARCH_SCORES}))
        search_out = self.models[SEARCH].config["output"]
        cfg = {
            "name": SEARCH_ENSEMBLE, "platform": "ensemble", "max_batch_size": self._max_batch([*models, SEARCH]),
            "input": inputs, "output": search_out, "ensemble_scheduling": {"step": steps},
        }
        return ModelDir(SEARCH_ENSEMBLE, cfg, {})

    def plan(self) -> dict[str, ModelDir]:
        # Composing models first: an ensemble's max_batch_size is read from them.
        directions = FAMILIES[self.family]
        composing = [self.tokenizer()] if self.family == "clap" else []
        composing += [self.exported(encoder_name(m, self.family)) for m in directions[0]]
        for s, t in directions:
            composing += [self.exported(sampler_name(s, t)), self.noise(s, t)]
        if self.opts.index is not None:
            composing.append(self.search(Path(self.opts.index)))
            if self._search_skips_sampler():
                composing.append(self.exported(head_name("text")))
        self.models.update((md.name, md) for md in composing)
        ensembles = [self.embedding_ensemble(s, t) for s, t in directions]
        if self.opts.index is not None:
            ensembles.append(self.search_ensemble())
        self.models.update((md.name, md) for md in ensembles)
        return self.models


def plan_repository(export_dir: str | Path | Manifest, **options: Any) -> dict[str, ModelDir]:
    """What :func:`build_repository` would write (configs as dicts, files as sources), without writing."""
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir, verify=True)
    return _Planner(man, RepoOptions(**options)).plan()


def build_repository(
    export_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write a Triton model repository for ``export_dir`` to ``out`` (atomically); return ``out``.

    ``options``: see :class:`RepoOptions` (``flavor``, ``index``, ``top_k``, ``gpu_platform`` ...).
    """
    man = Manifest.load(export_dir, verify=True)
    opts = RepoOptions(**options)
    models = _Planner(man, opts).plan()
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for md in models.values():
            _write_model(tmp, md)
        atomic_write_json(tmp / REPO_INFO, repository_info(man, opts, models))
    log.info("wrote %s Triton repository %s (%d models)", opts.flavor, out, len(models))
    return out


def _write_model(repo: Path, md: ModelDir) -> None:
    """``<model>/config.pbtxt`` and the files of version 1 (a source path is copied, a str written)."""
    d = repo / md.name
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(config_text(md.config))
    for dest, src in md.files.items():
        if isinstance(src, Path):
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, d / "1" / dest)  # a directory: the gallery index
        else:
            (d / "1" / dest).write_text(src)


def repository_info(man: Manifest, opts: RepoOptions, models: dict[str, ModelDir]) -> dict[str, Any]:
    """What :data:`REPO_INFO` records: the format, the options that shaped the repository, its provenance."""
    gpu = opts.flavor == "gpu"
    return {
        "format": REPO_FORMAT,
        "flavor": opts.flavor,
        "gpu_platform": opts.gpu_platform if gpu else None,
        "server_trt_version": opts.server_trt_version if gpu and opts.gpu_platform == "tensorrt_plan" else None,
        "precision": opts.precision if gpu else "fp32",
        "export_dir": str(man.root.resolve()),
        "preset": man.preset,
        "encoder_family": encoder_family(man),
        "checkpoint_sha256": man.checkpoint_sha256,
        "package_version": man.package_version,
        "default_seed": opts.default_seed,
        "top_k": json.loads(str(models[SEARCH].files["search.json"]))["k"] if SEARCH in models else None,
        "models": sorted(models),
    }


def read_repository_info(repo: str | Path) -> dict[str, Any]:
    p = Path(repo) / REPO_INFO
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: {repo} was not made by `diffgap triton-repo`")
    return json.loads(p.read_text())


# The platforms of the gpu flavour's exported graphs: backends the tritonserver bundled with
# nvidia-pytriton does not have (it ships the python backend only).
GPU_PLATFORMS_NEED_NGC = ("tensorrt_plan", "onnxruntime_onnx")
NGC_TRITON_HINT = (
    "serve it with NVIDIA's Triton image, nvcr.io/nvidia/tritonserver:<yy.mm>-py3 (docker/triton-gpu.Dockerfile "
    "adds the python models' dependencies), or make a portable repository (`diffgap triton-repo --flavor portable`)"
)


def check_servable_by_bundled_server(repo: str | Path) -> None:
    """UserError for a gpu-flavour repository: the bundled tritonserver cannot load its models."""
    repo = Path(repo)
    info = repo / REPO_INFO
    flavor = json.loads(info.read_text()).get("flavor") if info.is_file() else None
    gpu_models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt")
                        if any(f'platform: "{pl}"' in p.read_text() for pl in GPU_PLATFORMS_NEED_NGC))
    if flavor == "gpu" or gpu_models:
        what = f"models {', '.join(gpu_models)} run on " + "/".join(GPU_PLATFORMS_NEED_NGC) if gpu_models else "its models need GPU backends"
        raise UserError(
            f"{repo} is a gpu-flavour repository ({what}), which the tritonserver bundled with nvidia-pytriton "
            f"cannot load (python backend only): {NGC_TRITON_HINT}"
        )
