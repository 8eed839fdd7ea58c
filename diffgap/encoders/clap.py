"""CLAP encoders on the ``laion-clap`` package: building models, exportable modules, embedding.

Three ways to get a laion-clap ``CLAP`` model (always the package's own classes, never a copy):

* ``ClapEncoder.from_checkpoint(path)`` -- a real LAION-CLAP checkpoint (``630k-audioset-best.pt``,
  ``630k-best.pt``, music checkpoints ...): HTSAT-tiny/base audio tower + RoBERTa text tower. The
  RoBERTa config and tokenizer files come from the local Hugging Face cache (or ``roberta_dir``);
  nothing is downloaded unless ``DIFFGAP_ALLOW_HUB=1``. The ~500 MB roberta-base *weights* are never
  needed: the tower is built from its config and then overwritten by the checkpoint.
* ``ClapEncoder.from_arch("htsat-tiny")`` -- HTSAT-tiny + laion-clap's ``transformer`` text tower with
  its bundled CLIP BPE tokenizer, random weights, fully offline.
* ``ClapEncoder.from_arch("tiny")`` -- the same code with reduced widths/depths (tests, demo).

The exportable graphs are :class:`ClapTextEncoderModule` (token ids -> L2-normalised embedding) and
:class:`ClapAudioEncoderModule` (48 kHz waveform (B, 480000) -> L2-normalised embedding, laion-clap's
STFT + log-mel front end inside the graph). Each declares its I/O once with :meth:`io_spec`.

HTSAT batch freeze: laion-clap's ``htsat.window_reverse`` computes the batch size with
``int(windows.shape[0] / ...)``, which a tracer records as a Python constant, so an exported graph
silently scrambles every batch size but the example's. :func:`batch_agnostic_htsat` swaps in a
numerically identical version (``view(-1, ...)``) for the duration of our modules' ``forward`` --
site-packages is never edited.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffgap.core import audio as daudio
from diffgap.core.iospec import BATCH, IOSpec, TensorSpec

log = logging.getLogger(__name__)

EMBED_DIM = 512            # laion-clap's joint_embed_shape: every CLAP model's output width
CONTEXT_LENGTH = 77        # laion-clap text context (CLIP BPE and RoBERTa alike)
SAMPLE_RATE = daudio.SAMPLE_RATE
CLIP_SAMPLES = daudio.CLIP_SAMPLES


# ---------------------------------------------------------------------------------------------
# importing laion-clap safely
# ---------------------------------------------------------------------------------------------
def _import_laion_clap():
    """Import laion-clap's ``clap_module`` without ever hanging on the Hugging Face hub.

    laion-clap imports transformers, which probes the hub for minutes when offline; we force
    offline mode unless the user explicitly opts in with ``DIFFGAP_ALLOW_HUB=1``.
    """
    if os.environ.get("DIFFGAP_ALLOW_HUB") != "1":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from laion_clap.clap_module import factory, htsat, model as clap_model
    except ImportError as e:
        raise ImportError(
            f"laion-clap is not importable ({e}); install the training extra: pip install -e '.[train]'"
        ) from e
    return factory, htsat, clap_model


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClapArch:
    """A named CLAP architecture: a laion-clap model config plus optional HTSAT size overrides.

    ``htsat`` (when set) replaces the arguments laion-clap's ``create_htsat_model`` hard-codes for
    ``model_name`` -- the only way to get a smaller HTS-AT out of the same ``HTSAT_Swin_Transformer``.
    """

    name: str
    amodel: str                      # laion-clap model config name (model_configs/*.json)
    tmodel: str                      # "transformer" | "roberta"
    text_overrides: dict = dataclasses.field(default_factory=dict)
    htsat: dict | None = None        # kwargs for HTSAT_Swin_Transformer (embed_dim, depths, num_heads)
    doc: str = ""


ARCHS: dict[str, ClapArch] = {
    "htsat-tiny": ClapArch(
        "htsat-tiny", "HTSAT-tiny", "transformer",
        doc="HTSAT-tiny audio + 12-layer 512-wide CLIP-style text transformer (bundled BPE), random weights",
    ),
    # Same classes, ~1/6 the width: stage dims 16/32/64/128, two blocks per stage so shifted windows
    # (odd blocks) and patch merging are both exercised; 2-layer 64-wide text transformer.
    "tiny": ClapArch(
        "tiny", "HTSAT-tiny", "transformer",
        text_overrides={"width": 64, "heads": 2, "layers": 2},
        htsat={"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]},
        doc="reduced HTS-AT (embed 16) + 2-layer 64-wide text transformer, random weights (tests/demo)",
    ),
}


def get_arch(name: str) -> ClapArch:
    if name not in ARCHS:
        raise ValueError(f"unknown CLAP architecture {name!r}; choose one of {sorted(ARCHS)} or pass --checkpoint")
    return ARCHS[name]


@contextlib.contextmanager
def _htsat_size(clap_model_mod, htsat_mod, overrides: dict | None) -> Iterator[None]:
    """Make laion-clap's ``CLAP`` constructor build an HTS-AT with ``overrides`` (scoped)."""
    if not overrides:
        yield
        return
    original = clap_model_mod.create_htsat_model

    def create_small_htsat(audio_cfg, enable_fusion=False, fusion_type="None"):
        # Same fixed arguments as laion-clap's create_htsat_model (spec 256, patch 4, window 8).
        return htsat_mod.HTSAT_Swin_Transformer(
            spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=audio_cfg.class_num,
            window_size=8, config=audio_cfg, enable_fusion=enable_fusion, fusion_type=fusion_type,
            **overrides,
        )

    clap_model_mod.create_htsat_model = create_small_htsat
    try:
        yield
    finally:
        clap_model_mod.create_htsat_model = original


def _model_cfg(arch: ClapArch) -> dict:
    factory, _, _ = _import_laion_clap()
    if arch.amodel not in factory._MODEL_CONFIGS:
        raise ValueError(f"laion-clap has no model config {arch.amodel!r}; known: {factory.list_models()}")
    cfg = copy.deepcopy(factory._MODEL_CONFIGS[arch.amodel])
    cfg["text_cfg"].update(arch.text_overrides)
    cfg["text_cfg"]["model_type"] = arch.tmodel
    cfg["enable_fusion"] = False
    cfg["fusion_type"] = "None"
    if arch.htsat:
        # CLAP's audio_projection input = HTS-AT's final stage width (embed_dim * 2**(stages-1)).
        cfg["embed_dim"] = arch.htsat["embed_dim"] * 2 ** (len(arch.htsat["depths"]) - 1)
    return cfg


def build_clap_model(arch: ClapArch | str, seed: int = 0, roberta_config: Any = None):
    """Build laion-clap's ``CLAP`` for ``arch`` with seeded random weights, in eval mode.

    Returns ``(model, model_cfg)``. ``roberta_config`` (a ``transformers.RobertaConfig``) is required
    for ``tmodel="roberta"``: the tower is built from it instead of downloading roberta-base.
    """
    if isinstance(arch, str):
        arch = get_arch(arch)
    if arch.tmodel == "roberta" and roberta_config is None:
        raise ValueError("a RoBERTa text tower needs roberta-base's config (see load_clap_checkpoint)")
    _, htsat_mod, clap_model_mod = _import_laion_clap()
    cfg = _model_cfg(arch)
    # The scoped substitutions below swap laion-clap module globals: hold the patch lock meanwhile.
    with _PATCH_LOCK, torch.random.fork_rng(devices=[]), _htsat_size(clap_model_mod, htsat_mod, arch.htsat), \
            _roberta_from_config(clap_model_mod, roberta_config):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            # laion-clap's WindowAttention calls torch.meshgrid without indexing= (harmless: "ij").
            warnings.filterwarnings("ignore", message=".*torch.meshgrid.*")
            model = clap_model_mod.CLAP(**cfg)
    model.eval()
    return model, cfg


@contextlib.contextmanager
def _roberta_from_config(clap_model_mod, roberta_config) -> Iterator[None]:
    """Scoped: laion-clap's ``RobertaModel.from_pretrained('roberta-base')`` builds from a config.

    The checkpoint overwrites every text-tower weight right after, so downloading (or even caching)
    the 500 MB roberta-base weights would be pure waste; only its config is needed.
    """
    if roberta_config is None:
        yield
        return
    original = clap_model_mod.RobertaModel

    class _RobertaFromConfig:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            return original(roberta_config)

    clap_model_mod.RobertaModel = _RobertaFromConfig
    try:
        yield
    finally:
        clap_model_mod.RobertaModel = original


# ---------------------------------------------------------------------------------------------
# HTSAT batch-freeze fix (scoped module-level replacement; site-packages untouched)
# ---------------------------------------------------------------------------------------------
def _window_reverse_any_batch(windows, window_size: int, H: int, W: int):
    """laion-clap ``htsat.window_reverse`` with the batch axis inferred (``-1``) instead of ``int()``.

    windows: (nW*B, ws, ws, C) -> (B, H, W, C); identical values, but traceable for any batch.
    """
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


_PATCH_LOCK = threading.RLock()
_PATCH_DEPTH: dict[str, int] = {}
_PATCH_ORIGINAL: dict[str, Any] = {}


@contextlib.contextmanager
def batch_agnostic_htsat(htsat_module_name: str) -> Iterator[None]:
    """While active, ``window_reverse`` in laion-clap's htsat module (by name) is batch-agnostic.

    Re-entrant and restored on exit. The replacement is numerically identical, so concurrent eager
    callers elsewhere are unaffected; it exists only so that tracing (``torch.onnx.export``) records
    a dynamic batch axis.
    """
    mod = sys.modules[htsat_module_name]
    with _PATCH_LOCK:
        if _PATCH_DEPTH.get(htsat_module_name, 0) == 0:
            _PATCH_ORIGINAL[htsat_module_name] = mod.window_reverse
            mod.window_reverse = _window_reverse_any_batch
        _PATCH_DEPTH[htsat_module_name] = _PATCH_DEPTH.get(htsat_module_name, 0) + 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH[htsat_module_name] -= 1
            if _PATCH_DEPTH[htsat_module_name] == 0:
                mod.window_reverse = _PATCH_ORIGINAL.pop(htsat_module_name)


# ---------------------------------------------------------------------------------------------
# exportable modules
# ---------------------------------------------------------------------------------------------
class ClapTextEncoderModule(nn.Module):
    """Token ids -> L2-normalised CLAP text embedding, via laion-clap's ``CLAP.encode_text``.

    transformer tower: ``input_ids (B, 77) int64`` (CLIP BPE, 0-padded);
    roberta tower:     ``input_ids (B, 77) int64`` + ``attention_mask (B, 77) int64``.
    Output ``embedding (B, 512) float32``.
    """

    def __init__(self, clap, batch: tuple[int, int, int] = (1, 16, 128)) -> None:
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
    """

    def __init__(self, clap, batch: tuple[int, int, int] = (1, 8, 32)) -> None:
        super().__init__()
        if clap.audio_cfg.model_type != "HTSAT" or clap.enable_fusion:
            raise ValueError("only non-fusion HTS-AT CLAP models are exportable; got "
                             f"{clap.audio_cfg.model_type} fusion={clap.enable_fusion}")
        if int(clap.audio_cfg.clip_samples) != CLIP_SAMPLES or int(clap.audio_cfg.sample_rate) != SAMPLE_RATE:
            raise ValueError("audio encoder must take 10 s at 48 kHz (clip_samples 480000)")
        self.clap = clap
        self.batch = batch
        self._htsat_module = type(clap.audio_branch.layers[0].blocks[0]).__module__

    def io_spec(self) -> IOSpec:
        return audio_io_spec(*self.batch)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with batch_agnostic_htsat(self._htsat_module):
            out = self.clap.audio_branch({"waveform": waveform}, mixup_lambda=None, device=None)
        x = self.clap.audio_projection(out["embedding"])  # (B, 512)
        return F.normalize(x, dim=-1)


def text_io_spec(tower: str = "transformer", vocab_size: int = 49408,
                 min_batch: int = 1, opt_batch: int = 16, max_batch: int = 128) -> IOSpec:
    """The text encoder's I/O: token ids (and a mask for RoBERTa) in, ``embedding`` out."""
    inputs = [TensorSpec("input_ids", "int64", (BATCH, CONTEXT_LENGTH), low=0, high=vocab_size,
                         doc="token ids, 0-padded (CLIP BPE) or pad-id-padded (RoBERTa) to 77")]
    if tower == "roberta":
        inputs.append(TensorSpec("attention_mask", "int64", (BATCH, CONTEXT_LENGTH), low=1, high=2,
                                 doc="1 for real tokens, 0 for padding"))
    return IOSpec(
        name="clap_text_encoder",
        inputs=tuple(inputs),
        outputs=(TensorSpec("text_embedding", "float32", (BATCH, EMBED_DIM), doc="L2-normalised CLAP text embedding"),),
        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        meta={"tokenizer": "clip-bpe" if tower == "transformer" else "roberta",
              "context_length": CONTEXT_LENGTH, "text_tower": tower},
    )


def audio_io_spec(min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32) -> IOSpec:
    """The audio encoder's I/O: a 10 s 48 kHz waveform in, ``embedding`` out."""
    return IOSpec(
        name="clap_audio_encoder",
        inputs=(TensorSpec("waveform", "float32", (BATCH, CLIP_SAMPLES), low=-1.0, high=1.0,
                           doc="48 kHz mono, int16-quantised, repeat-padded to 10 s (diffgap.core.audio)"),),
        outputs=(TensorSpec("audio_embedding", "float32", (BATCH, EMBED_DIM), doc="L2-normalised CLAP audio embedding"),),
        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
        meta={"sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES},
    )


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
_ROBERTA_FILES_HELP = (
    "roberta-base's config.json and tokenizer files (tokenizer.json, or vocab.json + merges.txt): "
    "either pass --roberta-dir DIR holding them, or put them in the local Hugging Face cache "
    "(on a machine with network: `huggingface-cli download roberta-base config.json tokenizer.json "
    "vocab.json merges.txt`, then copy ~/.cache/huggingface or set HF_HOME)"
)


def _read_state_dict(path: Path) -> tuple[dict, dict | None]:
    """Load a LAION-CLAP (or diffgap-saved) checkpoint -> (state_dict without 'module.', diffgap arch)."""
    if not path.is_file():
        raise FileNotFoundError(f"CLAP checkpoint {path} not found; pass the path of e.g. 630k-audioset-best.pt")
    try:
        # weights_only: a checkpoint is data, never code (laion-clap's checkpoints load this way).
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                         "re-download it") from None
    arch = None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        arch = ckpt.get("diffgap_clap_arch")
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} holds no CLAP state dict (expected {{'state_dict': {{name: tensor}}}}); "
                         "pass a LAION-CLAP checkpoint such as 630k-audioset-best.pt")
    if next(iter(ckpt)).startswith("module."):
        ckpt = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}
    return ckpt, arch


def _infer_arch(sd: dict, path: Path) -> ClapArch:
    """Recover the architecture of a LAION-CLAP checkpoint from its tensor names and shapes."""
    if any(".fusion_model." in k or ".mel_conv2d." in k or ".mel_conv1d." in k for k in sd):
        raise ValueError(f"{path} is a feature-fusion CLAP checkpoint; diffgap supports non-fusion ones "
                         "(630k-best.pt, 630k-audioset-best.pt, music_*.pt)")
    key = "audio_branch.patch_embed.proj.weight"
    if key not in sd:
        raise ValueError(f"{path} is not an HTS-AT CLAP checkpoint: first missing key {key!r}")
    embed_dim = int(sd[key].shape[0])
    depths, heads = [], []
    for i in range(8):
        blocks = {k.split(".")[4] for k in sd if k.startswith(f"audio_branch.layers.{i}.blocks.")}
        if not blocks:
            break
        depths.append(len(blocks))
        heads.append(int(sd[f"audio_branch.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]))
    named = {96: ("HTSAT-tiny", [2, 2, 6, 2]), 128: ("HTSAT-base", [2, 2, 12, 2]), 256: ("HTSAT-large", [2, 2, 12, 2])}
    amodel, htsat = "HTSAT-tiny", {"embed_dim": embed_dim, "depths": depths, "num_heads": heads}
    if embed_dim in named and depths == named[embed_dim][1] and heads == [4, 8, 16, 32]:
        amodel, htsat = named[embed_dim][0], None
    if "text_branch.embeddings.word_embeddings.weight" in sd:
        return ClapArch(f"checkpoint:{amodel}+roberta", amodel, "roberta", htsat=htsat)
    if "token_embedding.weight" in sd:
        vocab, width = sd["token_embedding.weight"].shape
        layers = len({k.split(".")[2] for k in sd if k.startswith("text_branch.resblocks.")})
        # CLIP convention (64-dim heads); diffgap-saved checkpoints carry the exact arch instead.
        text = {"width": int(width), "heads": max(1, int(width) // 64), "layers": layers, "vocab_size": int(vocab)}
        return ClapArch(f"checkpoint:{amodel}+transformer", amodel, "transformer", text_overrides=text, htsat=htsat)
    raise ValueError(f"{path}: unknown text tower (neither RoBERTa 'text_branch.embeddings.*' nor transformer "
                     "'token_embedding.weight' keys); pass a LAION-CLAP checkpoint")


def _roberta_assets(roberta_dir: str | os.PathLike | None):
    """(RobertaConfig, tokenizer dir) from ``roberta_dir`` or the local HF cache; clear error if absent."""
    from transformers import RobertaConfig

    if roberta_dir is not None:
        d = Path(roberta_dir)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}/config.json missing: need {_ROBERTA_FILES_HELP}")
        return RobertaConfig.from_json_file(str(d / "config.json")), d
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download("roberta-base", local_files_only=os.environ.get("DIFFGAP_ALLOW_HUB") != "1",
                                   allow_patterns=["config.json", "tokenizer.json", "vocab.json", "merges.txt"]))
    except Exception as e:
        raise FileNotFoundError(f"roberta-base is not in the local Hugging Face cache ({type(e).__name__}); "
                                f"need {_ROBERTA_FILES_HELP}") from None
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; need {_ROBERTA_FILES_HELP}")
    return RobertaConfig.from_json_file(str(d / "config.json")), d


def _check_state_dict(model: nn.Module, sd: dict, path: Path, arch: ClapArch) -> None:
    """Refuse a checkpoint that does not fit ``model``, naming the first mismatch."""
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in sd:
            raise ValueError(f"{path} does not match CLAP {arch.amodel}+{arch.tmodel}: first missing key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{path} does not match CLAP {arch.amodel}+{arch.tmodel}: {k!r} has shape "
                             f"{tuple(sd[k].shape)} in the checkpoint but {tuple(v.shape)} in the model")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ValueError(f"{path} does not match CLAP {arch.amodel}+{arch.tmodel}: first unexpected key {extra[0]!r}")


def save_checkpoint(encoder: "ClapEncoder", path: str | os.PathLike) -> Path:
    """Write ``encoder``'s weights as a LAION-CLAP-style checkpoint (+ its named arch), atomically."""
    from diffgap.core.fsutil import atomic_path

    path = Path(path)
    payload = {"state_dict": encoder.model.state_dict(), "diffgap_clap_arch": dataclasses.asdict(encoder.arch)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_clap_checkpoint(path: str | os.PathLike, roberta_dir: str | os.PathLike | None = None):
    """A real LAION-CLAP checkpoint -> ``(model, model_cfg, arch, tokenizer)``; clear errors otherwise."""
    from diffgap.core.tokenizer import ClipBPETokenizer, RobertaTokenizer

    path = Path(path)
    sd, saved_arch = _read_state_dict(path)
    arch = ClapArch(**saved_arch) if saved_arch else _infer_arch(sd, path)
    roberta_config, tokenizer = None, None
    if arch.tmodel == "roberta":
        roberta_config, tok_dir = _roberta_assets(roberta_dir)
        tokenizer = RobertaTokenizer(tok_dir)  # refuses a placeholder (tiny-vocab) tokenizer
        if tokenizer.vocab_size != roberta_config.vocab_size:
            raise ValueError(f"RoBERTa tokenizer has {tokenizer.vocab_size} tokens but its config says "
                             f"{roberta_config.vocab_size}; the files in {tok_dir} do not belong together")
    else:
        tokenizer = ClipBPETokenizer.from_file()
    model, cfg = build_clap_model(arch, roberta_config=roberta_config)
    # laion-clap drops this buffer for transformers >= 4.31 (factory.load_state_dict); so do we.
    if "text_branch.embeddings.position_ids" not in model.state_dict():
        sd.pop("text_branch.embeddings.position_ids", None)
    _check_state_dict(model, sd, path, arch)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model, cfg, arch, tokenizer


# ---------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------
class ClapEncoder:
    """A laion-clap CLAP model with its tokenizer: ``encode_text`` / ``encode_audio`` -> (B, 512).

    Both run through the exportable modules, so eager embeddings and ONNX graphs share one path.
    """

    def __init__(self, model: nn.Module, model_cfg: dict, arch: ClapArch, tokenizer, source: str) -> None:
        self.model = model.eval()
        self.model_cfg = model_cfg
        self.arch = arch
        self.tokenizer = tokenizer
        self.source = source
        self.text_module = ClapTextEncoderModule(model).eval()
        self.audio_module = ClapAudioEncoderModule(model).eval()

    @classmethod
    def from_arch(cls, name: str = "tiny", seed: int = 0) -> "ClapEncoder":
        """A named offline architecture (``tiny`` | ``htsat-tiny``) with seeded random weights."""
        from diffgap.core.tokenizer import ClipBPETokenizer

        arch = get_arch(name)
        model, cfg = build_clap_model(arch, seed=seed)
        return cls(model, cfg, arch, ClipBPETokenizer.from_file(), source=f"arch:{name}:seed{seed}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, roberta_dir: str | os.PathLike | None = None) -> "ClapEncoder":
        """A LAION-CLAP checkpoint file (non-fusion HTS-AT; RoBERTa or transformer text tower)."""
        model, cfg, arch, tokenizer = load_clap_checkpoint(path, roberta_dir)
        return cls(model, cfg, arch, tokenizer, source=str(Path(path).resolve()))

    @classmethod
    def load(cls, arch: str | None = None, checkpoint: str | os.PathLike | None = None,
             roberta_dir: str | os.PathLike | None = None, seed: int = 0) -> "ClapEncoder":
        if checkpoint is not None:
            return cls.from_checkpoint(checkpoint, roberta_dir)
        return cls.from_arch(arch or "tiny", seed)

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """texts -> the text encoder's feed dict (names from its IOSpec)."""
        return self.tokenizer.feeds(list(texts))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """texts -> (B, 512) float32, L2-normalised."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        out = []
        for i in range(0, len(texts), batch_size):
            feeds = self.tokenize(texts[i:i + batch_size])
            out.append(self.text_module(*(torch.from_numpy(feeds[n]) for n in self.text_module.io_spec().input_names)))
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    # -- audio -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_clips(self, clips: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Prepared clips (N, 480000) float32 -> (N, 512) (no preprocessing applied)."""
        clips = np.ascontiguousarray(clips, dtype=np.float32)
        if clips.ndim != 2 or clips.shape[1] != CLIP_SAMPLES:
            raise ValueError(f"clips must be (N, {CLIP_SAMPLES}) float32, got {clips.shape}; use diffgap.core.audio.prepare_clips")
        out = [self.audio_module(torch.from_numpy(clips[i:i + batch_size])) for i in range(0, len(clips), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, EMBED_DIM), np.float32)

    def encode_audio(self, waveforms: Sequence[np.ndarray] | np.ndarray, sample_rate: int = SAMPLE_RATE,
                     long_clip: str = "center", batch_size: int = 8) -> np.ndarray:
        """waveforms (each (T,) or (T, C), any length, at ``sample_rate``) -> (B, 512) float32.

        laion-clap's data path (:mod:`diffgap.core.audio`): mono, 48 kHz, int16 round trip, repeat-pad;
        longer clips follow ``long_clip`` ("chunks" averages the normalised chunk embeddings).
        """
        per_item = [daudio.prepare_clips(np.asarray(w), sample_rate, long_clip) for w in waveforms]
        return self.encode_clip_groups(per_item, batch_size)

    def encode_clip_groups(self, per_item: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """One (n_i, 480000) group of prepared clips per item -> (items, 512); groups of n_i > 1
        (long_clip="chunks") average their L2-normalised embeddings and re-normalise."""
        if not per_item:
            return np.zeros((0, EMBED_DIM), np.float32)
        emb = self.encode_clips(np.concatenate(per_item), batch_size)
        out, i = np.empty((len(per_item), EMBED_DIM), np.float32), 0
        for j, clips in enumerate(per_item):
            e = emb[i:i + len(clips)]
            i += len(clips)
            if len(e) == 1:
                out[j] = e[0]
            else:
                m = e.mean(axis=0)
                out[j] = m / max(float(np.linalg.norm(m)), 1e-12)
        return out

    def info(self) -> dict[str, Any]:
        return {"arch": dataclasses.asdict(self.arch), "source": self.source,
                "tokenizer": self.tokenizer.kind, "embed_dim": EMBED_DIM}


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
_DEMO_CLIPS = (
    # (file stem, caption, how to synthesise it) -- distinct spectra so retrieval is non-trivial
    ("tone_440", "a steady 440 hertz sine tone", "sine"),
    ("sweep_up", "a rising sine sweep from low to high pitch", "sweep"),
    ("noise_white", "loud white noise hiss", "noise"),
    ("beeps", "short repeated beeps with silence between them", "beeps"),
    ("silence", "near silence", "silence"),
)


def _demo_signal(kind: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    if kind == "sine":
        x = 0.5 * np.sin(2 * np.pi * 440.0 * t)
    elif kind == "sweep":
        k = np.log(8000.0 / 100.0) / seconds
        x = 0.5 * np.sin(2 * np.pi * 100.0 * (np.exp(k * t) - 1) / k)
    elif kind == "noise":
        x = 0.3 * rng.standard_normal(len(t))
    elif kind == "beeps":
        x = 0.5 * np.sin(2 * np.pi * 1000.0 * t) * ((t % 0.5) < 0.1)
    else:
        x = 1e-4 * rng.standard_normal(len(t))
    return np.clip(x, -1, 1).astype(np.float32)


def demo_embed(out_dir: str | os.PathLike, arch: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Show the encoder path end to end: synthesise clips + a Clotho-style captions CSV under
    ``out_dir/clips``, embed them with ``arch`` into ``out_dir/clap_pairs.npz`` (``diffgap embed``'s
    code path) and return a summary (paths, shape, text->audio cosine matrix, a few token ids).
    """
    import csv

    import soundfile as sf

    from diffgap.core.data import load_pairs
    from diffgap.encoders.dataset import embed_plan, plan_from_csv

    out_dir = Path(out_dir)
    clips = out_dir / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # varied rates/lengths/channels exercise the data path: 16 kHz mono 3 s ... 44.1 kHz stereo 12 s
    formats = [(16000, 1, 3.0), (44100, 2, 12.0), (48000, 1, 10.0), (22050, 2, 1.0), (48000, 1, 4.0)]
    with open(clips / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1"])
        for (stem, caption, kind), (sr, ch, secs) in zip(_DEMO_CLIPS, formats):
            x = _demo_signal(kind, secs, sr, rng)
            sf.write(clips / f"{stem}.wav", np.stack([x] * ch, 1) if ch > 1 else x, sr)
            w.writerow([f"{stem}.wav", caption])
    encoder = ClapEncoder.from_arch(arch, seed=seed)
    npz = out_dir / "clap_pairs.npz"
    embed_plan(plan_from_csv(clips / "captions.csv"), encoder, npz, batch_size=4, progress=False, overwrite=True)
    pairs = load_pairs(npz)
    cos = pairs["text"] @ pairs["audio"].T  # (N, N) text -> audio cosine (random weights: no semantics)
    return {
        "npz": str(npz), "n_pairs": len(pairs), "embed_dim": pairs.embed_dim, "arch": arch,
        "ids": pairs.ids.tolist(), "captions": pairs.captions.tolist(),
        "text_audio_cosine": cos.round(4).tolist(),
        "first_tokens": encoder.tokenize([pairs.captions[0]])["input_ids"][0, :8].tolist(),
        "unit_norm": bool(np.allclose(np.linalg.norm(pairs["audio"], axis=1), 1, atol=1e-5)),
    }
