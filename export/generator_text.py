"""The generator's own CLAP text tower as an exported graph: the text encoder of the generation ensembles.

A bridge that conditions a generator is trained on embeddings of *the generator's* CLAP
(``diffgap embed --hf-clap GENERATOR_DIR``), and ``diffgap generate`` embeds captions with that same
tower (:class:`diffgap.encoders.hf_clap.HFClapEncoder`). Serving must embed identically, so
:func:`add_generator_text_encoder` exports that tower -- ``text_model`` -> pooled output ->
``text_projection`` -> L2 normalisation, the pipelines' prompt encoding -- into an existing export
directory as :data:`~diffgap.core.names.GENERATOR_TEXT_ENCODER` (FP32, and FP16 with the text-encoder
rules of :mod:`diffgap.export.fp16`), with the generator's tokenizer folder as the asset
:data:`~diffgap.core.names.GENERATOR_TOKENIZER_ASSET` (read torch-free by
:class:`diffgap.core.tokenizer.HFTokenizer`). The Triton generation repository
(:mod:`diffgap.triton_models.generation`) reads both from the manifest.

The tower's identity (:func:`diffgap.encoders.hf_clap.fingerprint`) is recorded in the graph's
metadata and checked against the CLAP the condition sampler's checkpoint was trained on.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffgap.core.errors import UserError
from diffgap.core.iospec import BATCH, BATCH_PROFILES, ROLE_ATTENTION_MASK, ROLE_TOKEN_IDS, ROLES, IOSpec, TensorSpec
from diffgap.core.manifest import Manifest, ModelEntry
from diffgap.core.names import GENERATOR_TEXT_ENCODER, GENERATOR_TOKENIZER_ASSET, encoder_name
from diffgap.core.tokenizer import HFTokenizer

log = logging.getLogger(__name__)

TOKENIZER_DIR = "generator_tokenizer"  # folder of the export holding the tokenizer files


class GeneratorTextEncoder(nn.Module):
    """``forward(input_ids (B, L) int64, attention_mask (B, L) int64) -> (B, E)`` unit-norm text embeddings."""

    def __init__(self, encoder: Any) -> None:  # diffgap.encoders.hf_clap.HFClapEncoder
        super().__init__()
        tower = encoder.tower
        self.text_model = tower.text_model
        self.text_projection = tower.text_projection
        self.identity = encoder.identity()
        self.embed_dim = int(encoder.embed_dim)
        self.context_length = int(encoder.tokenizer.model_max_length)
        self.vocab_size = int(tower.text_model.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_projection(out.pooler_output).float(), dim=-1)

    def io_spec(self) -> IOSpec:
        L, E = self.context_length, self.embed_dim
        ids = TensorSpec("input_ids", "int64", (BATCH, L), low=0, high=self.vocab_size, doc="token ids, padded to the context length")
        mask = TensorSpec("attention_mask", "int64", (BATCH, L), low=0, high=2, doc="1 on real tokens, 0 on padding")
        emb = TensorSpec("text_embedding", "float32", (BATCH, E), doc="the generator's CLAP text embedding, unit norm")
        lo, opt, hi = BATCH_PROFILES[encoder_name("text", "clap")]
        return IOSpec(
            name=GENERATOR_TEXT_ENCODER, inputs=(ids, mask), outputs=(emb,), min_batch=lo, opt_batch=opt, max_batch=hi,
            meta={"tokenizer": HFTokenizer.kind, "encoder": self.identity, "embed_dim": E,
                  ROLES: {ROLE_TOKEN_IDS: ids.name, ROLE_ATTENTION_MASK: mask.name}},
        )


def _calibration(tokenizer: HFTokenizer, io: IOSpec) -> dict:
    from . import calibration as cal

    return tokenizer.feeds(cal.captions(cal.CALIBRATION_BATCH, 1), io)


def add_generator_text_encoder(
    export_dir: str | os.PathLike,
    generator: str | os.PathLike,
    *,
    fp16: bool = True,
    any_clap: bool = False,
    opset: int | None = None,
) -> Manifest:
    """Export ``generator``'s CLAP text tower (a diffusers AudioLDM/MusicLDM folder or a ``ClapModel``
    folder) into ``export_dir``; returns the updated manifest.

    Refused (one-line :class:`UserError`) when the tower's width differs from the export's embedding
    width, or when the export's condition sampler was trained on another CLAP (unless ``any_clap``).
    New files are written under a temporary folder and moved in; ``manifest.json`` is rewritten last.
    """
    from diffgap.encoders.hf_clap import HFClapEncoder

    from .onnx_export import DEFAULT_OPSET, META_GRAPH_PRECISION, export_module

    root = Path(export_dir)
    man = Manifest.load(root, verify=True)
    enc = HFClapEncoder.load(generator)
    if enc.embed_dim != man.embed_dim:
        raise UserError(f"the generator's CLAP emits {enc.embed_dim}-d embeddings but export {root} bridges {man.embed_dim}-d ones; "
                        "export a checkpoint trained on this generator's CLAP")
    mine = enc.identity()
    for name, entry in man.models.items():
        trained = entry.io.meta.get("encoder") if isinstance(entry.io.meta.get("encoder"), dict) else None
        if trained and trained.get("fingerprint") and trained["fingerprint"] != mine["fingerprint"] and not any_clap:
            raise UserError(f"{name} of export {root} was trained on CLAP {trained['fingerprint'][:12]} but the generator's CLAP is "
                            f"{mine['fingerprint'][:12]}; export a checkpoint trained on `diffgap embed --hf-clap {generator}` "
                            "embeddings, or pass any_clap=True")
    tok_src = Path(generator) / "tokenizer" if (Path(generator) / "model_index.json").is_file() else Path(generator)
    tokenizer = HFTokenizer(tok_src)
    module = GeneratorTextEncoder(enc).eval()
    if tokenizer.context_length != module.context_length:
        raise UserError(f"{tok_src}: tokenizer context {tokenizer.context_length} != the tower's {module.context_length}; wrong folder")
    io = module.io_spec()
    files = {"fp32": f"{io.name}.onnx"}
    meta = {"diffgap.model": io.name, "diffgap.embed_dim": str(man.embed_dim), "diffgap.encoder": mine["fingerprint"]}
    with tempfile.TemporaryDirectory(prefix=".generator-text-", dir=root) as tmp_s:
        tmp = Path(tmp_s)
        with torch.no_grad():
            export_module(module, io, tmp / files["fp32"], opset=opset or DEFAULT_OPSET,
                          metadata={**meta, META_GRAPH_PRECISION: "fp32"})
        if fp16:
            from .fp16 import convert_fp16

            files["fp16"] = f"{io.name}.fp16.onnx"
            convert_fp16(tmp / files["fp32"], tmp / files["fp16"], io, kind="text_encoder", calibration=_calibration(tokenizer, io))
        tokenizer.save(tmp / TOKENIZER_DIR)
        for old in [*(man.models[io.name].files.values() if io.name in man.models else ()), TOKENIZER_DIR]:
            p = root / old
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for rel in [*files.values(), TOKENIZER_DIR]:
            os.replace(tmp / rel, root / rel)
    man.models[io.name] = ModelEntry(io=io, files=files, meta={"encoder": mine, "tokenizer": HFTokenizer.kind})
    # Assets are files (the manifest hashes each); the tokenizer is read from tokenizer.json's folder.
    man.assets[GENERATOR_TOKENIZER_ASSET] = f"{TOKENIZER_DIR}/tokenizer.json"
    if (root / TOKENIZER_DIR / "tokenizer_config.json").is_file():
        man.assets[f"{GENERATOR_TOKENIZER_ASSET}_config"] = f"{TOKENIZER_DIR}/tokenizer_config.json"
    man.hash_files()
    man.save()
    log.info("exported the generator's CLAP text tower (%s) into %s", mine["fingerprint"][:12], root)
    return man
