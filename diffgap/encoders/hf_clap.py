"""CLAP from ``transformers`` as an embedding source: a local ``ClapModel`` folder, or the text tower
of a local diffusers generator folder (AudioLDM: ``text_encoder`` = ``ClapTextModelWithProjection``;
MusicLDM: ``text_encoder`` = a full ``ClapModel`` plus ``feature_extractor``).

Bridges that condition a generator must be trained on the generator's own CLAP space, so
:class:`HFClapEncoder` embeds exactly as the diffusers pipelines prompt their UNet: captions padded to
the tokenizer's ``model_max_length``, the pooled text output through ``text_projection``, L2-normalised
(AudioLDM's ``_encode_prompt``; ``ClapModel.get_text_features``). Audio goes through
``ClapFeatureExtractor`` at 48 kHz and ``ClapModel.get_audio_features``.

:func:`fingerprint` identifies a CLAP by its text tower: a sha256 over the names, shapes and float32
bytes of every ``text_model.*`` / ``text_projection.*`` tensor. A ``ClapModel`` and an AudioLDM
``ClapTextModelWithProjection`` converted from the same CLAP share these tensors (the same names in
both classes), so the fingerprint of the folder used for ``diffgap embed`` matches the generator's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffgap.core.errors import UserError

log = logging.getLogger(__name__)

KIND = "hf-clap"
SAMPLE_RATE = 48000          # CLAP's audio rate (ClapFeatureExtractor default)
TEXT_PREFIXES = ("text_model.", "text_projection.")
GENERATOR_INDEX = "model_index.json"


def fingerprint(tower: torch.nn.Module) -> str:
    """sha256 over the text tower's tensors (see the module docstring)."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        if not name.startswith(TEXT_PREFIXES):
            continue
        a = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(f"{name}:{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _need(path: Path, what: str, where: Path) -> Path:
    if not path.exists():
        raise UserError(f"{where} has no {path.relative_to(where).as_posix()}: {what}")
    return path


def _read_index(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / GENERATOR_INDEX).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / GENERATOR_INDEX} is not readable JSON ({e}); save the generator with save_pretrained") from None


class HFClapEncoder:
    """Text (and, with a full ``ClapModel``, audio) embeddings of a local ``transformers`` CLAP, (B, E) unit norm."""

    def __init__(self, tower: torch.nn.Module, tokenizer, feature_extractor=None, source: str = "") -> None:
        self.tower = tower.eval()
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.source = source
        self.embed_dim = int(tower.text_projection.weight.shape[0] if hasattr(tower.text_projection, "weight")
                             else tower.config.projection_dim)
        self._fingerprint: str | None = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike) -> "HFClapEncoder":
        """A ``ClapModel`` folder (``config.json`` of model_type ``clap``) or a diffusers generator folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"CLAP folder {folder} does not exist; pass a local ClapModel folder or a diffusers generator folder")
        if (folder / GENERATOR_INDEX).exists():
            return cls.from_generator(folder)
        return cls.from_clap_folder(folder)

    @classmethod
    def from_clap_folder(cls, folder: Path) -> "HFClapEncoder":
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        _need(folder / "config.json", "a ClapModel folder needs config.json + weights (ClapModel.save_pretrained)", folder)
        model = ClapModel.from_pretrained(str(folder), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        fe = None
        if (folder / "preprocessor_config.json").exists():
            fe = ClapFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        return cls(model, tok, fe, source=str(folder.resolve()))

    @classmethod
    def from_generator(cls, folder: Path) -> "HFClapEncoder":
        """The text tower (and MusicLDM's feature extractor) of a diffusers AudioLDM/MusicLDM folder."""
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel, ClapTextModelWithProjection

        index = _read_index(folder)
        enc_dir = _need(folder / "text_encoder", "put the pipeline's CLAP text encoder there (save_pretrained layout)", folder)
        _need(folder / "tokenizer", "put the pipeline's RoBERTa tokenizer there (save_pretrained layout)", folder)
        cls_name = (index.get("text_encoder") or [None, None])[1]
        tower_cls = ClapModel if cls_name == "ClapModel" else ClapTextModelWithProjection
        tower = tower_cls.from_pretrained(str(enc_dir), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        fe = None
        if tower_cls is ClapModel and (folder / "feature_extractor").exists():
            fe = ClapFeatureExtractor.from_pretrained(str(folder / "feature_extractor"), local_files_only=True)
        return cls(tower, tok, fe, source=str(folder.resolve()))

    @classmethod
    def from_pipeline(cls, pipe: Any, source: str = "") -> "HFClapEncoder":
        """The text tower of an already loaded AudioLDM/MusicLDM pipeline."""
        return cls(pipe.text_encoder, pipe.tokenizer, getattr(pipe, "feature_extractor", None), source)

    # -- identity --------------------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.tower)
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of the space it was trained on (and ``diffgap generate`` checks)."""
        return {"kind": KIND, "fingerprint": self.fingerprint(), "source": self.source, "embed_dim": self.embed_dim}

    def info(self) -> dict[str, Any]:
        return {"arch": {"kind": KIND, "class": type(self.tower).__name__, "fingerprint": self.fingerprint()},
                "source": self.source, "embed_dim": self.embed_dim}

    # -- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text_tensor(self, texts: Sequence[str]) -> torch.Tensor:
        """texts -> (B, E) float32 torch tensor, unit norm (the pipelines' prompt encoding)."""
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        dev = next(self.tower.parameters()).device
        out = self.tower.text_model(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))
        return F.normalize(self.tower.text_projection(out.pooler_output).float(), dim=-1)

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate([self.encode_text_tensor(texts[i:i + batch_size]).cpu().numpy()
                               for i in range(0, len(texts), batch_size)]).astype(np.float32, copy=False)

    # -- audio -----------------------------------------------------------------------------
    def _check_audio(self) -> None:
        if not hasattr(self.tower, "get_audio_features") or self.feature_extractor is None:
            raise UserError(f"{self.source} has no CLAP audio tower + feature extractor (AudioLDM ships the text tower only); "
                            "embed audio with a full ClapModel folder of the same CLAP (--hf-clap CLAP_DIR)")

    @torch.no_grad()
    def encode_clips(self, clips: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """48 kHz clips (N, T) float32 -> (N, E) unit norm (ClapFeatureExtractor's own crop/pad)."""
        self._check_audio()
        out = []
        for i in range(0, len(clips), batch_size):
            feats = self.feature_extractor(list(np.asarray(clips[i:i + batch_size], np.float32)), sampling_rate=SAMPLE_RATE,
                                           return_tensors="pt")
            res = self.tower.get_audio_features(input_features=feats["input_features"], is_longer=feats.get("is_longer"))
            emb = res.pooler_output if hasattr(res, "pooler_output") else res
            out.append(F.normalize(emb.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_clip_groups(self, per_item: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """One (n_i, T) group of prepared clips per item -> (items, E); groups average and re-normalise."""
        if not per_item:
            return np.zeros((0, self.embed_dim), np.float32)
        emb = self.encode_clips(np.concatenate(per_item), batch_size)
        out, i = np.empty((len(per_item), self.embed_dim), np.float32), 0
        for j, clips in enumerate(per_item):
            m = emb[i:i + len(clips)].mean(axis=0)
            i += len(clips)
            out[j] = m / max(float(np.linalg.norm(m)), 1e-12)
        return out
