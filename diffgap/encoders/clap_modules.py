"""The exportable CLAP graphs and their I/O declarations.

:class:`ClapTextEncoderModule` (token ids -> L2-normalised embedding) and
:class:`ClapAudioEncoderModule` (48 kHz waveform (B, 480000) -> L2-normalised embedding, laion-clap's
STFT + log-mel front end inside the graph). Each declares its I/O once with ``io_spec()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffgap.core import audio as daudio
from diffgap.core.iospec import (
    BATCH, BATCH_PROFILES, ROLE_ATTENTION_MASK, ROLE_TOKEN_IDS, ROLES, BatchProfile, IOSpec, TensorSpec,
)
from diffgap.core.names import encoder_name
from diffgap.core.tokenizer import CONTEXT_LENGTH, ClipBPETokenizer, RobertaTokenizer

from .laion_clap_patch import batch_agnostic_htsat

EMBED_DIM = 512            # laion-clap's joint_embed_shape: every CLAP model's output width
SAMPLE_RATE = daudio.SAMPLE_RATE
CLIP_SAMPLES = daudio.CLIP_SAMPLES
TEXT_ENCODER = encoder_name("text", "clap")
AUDIO_ENCODER = encoder_name("audio", "clap")
CLIP_VOCAB_SIZE = 49408    # laion-clap text_cfg.vocab_size of the transformer tower


class ClapTextEncoderModule(nn.Module):
    """Token ids -> L2-normalised CLAP text embedding, via laion-clap's ``CLAP.encode_text``.

    transformer tower: ``input_ids (B, 77) int64`` (CLIP BPE, 0-padded);
    roberta tower:     ``input_ids (B, 77) int64`` + ``attention_mask (B, 77) int64``.
    Output ``text_embedding (B, 512) float32``.
    """

    def __init__(self, clap, batch: BatchProfile = BATCH_PROFILES[TEXT_ENCODER]) -> None:
        super().__init__()
        self.clap = clap
        self.tower = clap.text_branch_type
        if self.tower not in ("transformer", "roberta"):
            raise ValueError(f"text tower {self.tower!r} is not exportable here; use transformer or roberta")
        self.vocab_size = int(
            clap.vocab_size if self.tower == "transformer"
            else clap.text_branch.embeddings.word_embeddings.num_embeddings
        )
        self.batch = batch

    def io_spec(self) -> IOSpec:
        return text_io_spec(self.tower, self.vocab_size, *self.batch)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.tower == "transformer":
            # int32 ids: same embedding rows and EOT argmax as int64, but TensorRT's ArgMax/TopK
            # takes int32, not int64 (the I/O stays int64, like every HF/ORT text model).
            x = self.clap.encode_text(input_ids.to(torch.int32), device=None)  # (B, 512)
        else:
            if attention_mask is None:
                raise ValueError("the roberta text tower needs attention_mask (B, 77)")
            x = self.clap.encode_text({"input_ids": input_ids, "attention_mask": attention_mask}, device=None)
        return F.normalize(x, dim=-1)


class ClapAudioEncoderModule(nn.Module):
    """48 kHz mono waveform (B, 480000) float32 -> L2-normalised CLAP audio embedding (B, 512).

    laion-clap's non-fusion HTS-AT path end to end: STFT + log-mel (torchlibrosa) + bn0 +
    reshape_wav2img + Swin stages + audio_projection, then ``F.normalize`` -- exactly
    ``CLAP.get_audio_embedding`` on ``{"waveform": x}``. The waveform must already be laion-clap
    preprocessed (int16 round trip, pad/repeat to 10 s): see :func:`diffgap.core.audio.prepare_clips`.
    The forward runs under :func:`~diffgap.encoders.laion_clap_patch.batch_agnostic_htsat`, so a traced
    graph keeps a dynamic batch axis.
    """

    def __init__(self, clap, batch: BatchProfile = BATCH_PROFILES[AUDIO_ENCODER]) -> None:
        super().__init__()
        if clap.audio_cfg.model_type != "HTSAT" or clap.enable_fusion:
            raise ValueError("only non-fusion HTS-AT CLAP models are exportable; got "
                             f"{clap.audio_cfg.model_type} fusion={clap.enable_fusion}")
        if int(clap.audio_cfg.clip_samples) != CLIP_SAMPLES or int(clap.audio_cfg.sample_rate) != SAMPLE_RATE:
            raise ValueError("audio encoder must take 10 s at 48 kHz (clip_samples 480000)")
        self.clap = clap
        self.batch = batch

    def io_spec(self) -> IOSpec:
        return audio_io_spec(*self.batch)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with batch_agnostic_htsat():
            out = self.clap.audio_branch({"waveform": waveform}, mixup_lambda=None, device=None)
        x = self.clap.audio_projection(out["embedding"])  # (B, 512)
        return F.normalize(x, dim=-1)


def text_io_spec(tower: str = "transformer", vocab_size: int = CLIP_VOCAB_SIZE,
                 min_batch: int = BATCH_PROFILES[TEXT_ENCODER][0], opt_batch: int = BATCH_PROFILES[TEXT_ENCODER][1],
                 max_batch: int = BATCH_PROFILES[TEXT_ENCODER][2]) -> IOSpec:
    """The text encoder's I/O: token ids (and a mask for RoBERTa) in, ``text_embedding`` out.

    The tokenizer's output is keyed by the roles declared here (``meta["roles"]``).
    """
    ids = TensorSpec("input_ids", "int64", (BATCH, CONTEXT_LENGTH), low=0, high=vocab_size,
                     doc=f"token ids, 0-padded (CLIP BPE) or pad-id-padded (RoBERTa) to {CONTEXT_LENGTH}")
    inputs, roles = [ids], {ROLE_TOKEN_IDS: ids.name}
    if tower == "roberta":
        mask = TensorSpec("attention_mask", "int64", (BATCH, CONTEXT_LENGTH), low=1, high=2,
                          doc="1 for real tokens, 0 for padding")
        inputs.append(mask)
        roles[ROLE_ATTENTION_MASK] = mask.name
    return IOSpec(
        name=TEXT_ENCODER,
        inputs=tuple(inputs),
        outputs=(TensorSpec("text_embedding", "float32", (BATCH, EMBED_DIM), doc="L2-normalised CLAP text embedding"),),
        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        meta={"tokenizer": ClipBPETokenizer.kind if tower == "transformer" else RobertaTokenizer.kind,
              "text_tower": tower, ROLES: roles},
    )


def audio_io_spec(min_batch: int = BATCH_PROFILES[AUDIO_ENCODER][0], opt_batch: int = BATCH_PROFILES[AUDIO_ENCODER][1],
                  max_batch: int = BATCH_PROFILES[AUDIO_ENCODER][2]) -> IOSpec:
    """The audio encoder's I/O: a 10 s 48 kHz waveform in, ``audio_embedding`` out."""
    return IOSpec(
        name=AUDIO_ENCODER,
        inputs=(TensorSpec("waveform", "float32", (BATCH, CLIP_SAMPLES), low=-1.0, high=1.0,
                           doc="48 kHz mono, int16-quantised, repeat-padded to 10 s (diffgap.core.audio)"),),
        outputs=(TensorSpec("audio_embedding", "float32", (BATCH, EMBED_DIM), doc="L2-normalised CLAP audio embedding"),),
        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        meta={"sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES},
    )
