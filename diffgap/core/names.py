"""Every name two layers must agree on, declared once.

Export names (what ``manifest.json`` lists, what the runtime opens, what Triton serves), the ONNX
``metadata_props`` keys the exporter writes and the runtime reads, and the Triton repository's own
model names. Tensor names are not here: each module's :class:`~diffgap.core.iospec.IOSpec` declares
its own, and callers look them up by role.
"""
from __future__ import annotations

FAMILIES = ("clap", "cavp")

# The file naming an export's models (diffgap.core.manifest) and a gallery index's arrays
# (diffgap.runtime.gallery), each at the root of its directory.
MANIFEST = "manifest.json"

# Graph precisions an export ships (``<name>.onnx`` fp32, ``<name>.fp16.onnx``) and engines are built in.
PRECISIONS = ("fp32", "fp16")
# Runtime backends (diffgap.runtime.session): onnxruntime CPU / CUDA / TensorRT EP, or TensorRT itself.
BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt")

# ONNX metadata_props keys written by diffgap.export and read by diffgap.runtime.
META_IO_SPEC = "diffgap.io_spec"     # IOSpec.to_dict() as json
META_GRAPH_PRECISION = "diffgap.precision"  # "fp32" | "fp16": the graph's own precision

SAMPLER_PREFIX = "diffgap_"

# Checkpoint meta key (and embeddings .npz array) holding the identity of the frozen encoder the
# embeddings came from (``diffgap embed --hf-clap``); ``diffgap generate`` checks it.
META_ENCODER = "encoder"

# Bridge samples per query (and per gallery item) in the runtime, Triton and the ``full`` row of
# ``diffgap eval`` that chooses their fusion weights: one draw from the item's seeded noise.
RUNTIME_SAMPLES = 1


def encoder_name(modality: str, family: str = "clap") -> str:
    """Export name of ``modality``'s encoder in the ``family`` space: ``clap_text_encoder``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; use one of {FAMILIES}")
    return f"{family}_{modality}_encoder"


def sampler_name(source: str, target: str) -> str:
    """Export name of the fused sampler bridging ``source`` -> ``target``: ``diffgap_text_to_audio``."""
    return f"{SAMPLER_PREFIX}{source}_to_{target}"


def parse_sampler_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`sampler_name`: ``"diffgap_text_to_audio"`` -> ``("text", "audio")``."""
    if not name.startswith(SAMPLER_PREFIX) or "_to_" not in name:
        raise ValueError(f"{name!r} is not a fused sampler export name ({SAMPLER_PREFIX}<source>_to_<target>)")
    source, _, target = name[len(SAMPLER_PREFIX):].partition("_to_")
    return source, target


def head_name(modality: str) -> str:
    """Export name of ``modality``'s contrastive head alone (embedding -> head space): ``text_head``.
    What a query or gallery item needs where the fusion weights give the bridged terms weight 0."""
    return f"{modality}_head"


def noise_model_name(source: str, target: str) -> str:
    """Triton model that draws the sampler's seeded noise."""
    return f"{sampler_name(source, target)}_noise"


def embedding_ensemble_name(source: str, target: str) -> str:
    """Triton ensemble joining ``source``'s encoder and the sampler: ``text_to_audio_embedding``."""
    return f"{source}_to_{target}_embedding"


# ---- generation: the raw-space conditioning sampler of CLAP-conditioned generators ----------------
# Not under SAMPLER_PREFIX: parse_sampler_name reads every ``diffgap_*`` model as a retrieval sampler.
def condition_sampler_name(source: str, target: str) -> str:
    """Export name of the fused K-step sampler whose output is a *raw-space* (CLAP/CAVP) target
    embedding, the generator's condition: ``text_to_audio_condition_sampler``."""
    return f"{source}_to_{target}_condition_sampler"


def condition_ensemble_name(source: str, target: str) -> str:
    """Triton ensemble: ``source``'s encoder -> N seeded condition samples: ``text_to_audio_condition``."""
    return f"{source}_to_{target}_condition"


# The generator's own CLAP text tower as an exported graph (``export/generator_text.py``), and the
# manifest asset key of its tokenizer folder: the text encoder of the generation ensembles, so a
# served caption is embedded exactly as the generator (and ``diffgap generate``) embeds it.
GENERATOR_TEXT_ENCODER = "generator_text_encoder"
GENERATOR_TOKENIZER_ASSET = "generator_tokenizer"
