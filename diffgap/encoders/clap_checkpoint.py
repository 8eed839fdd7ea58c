"""LAION-CLAP checkpoints: reading, recovering their architecture, checking and loading them.

A real LAION-CLAP checkpoint (``630k-audioset-best.pt``, ``630k-best.pt``, music checkpoints ...) holds an
HTSAT-tiny/base audio tower and a RoBERTa text tower. The RoBERTa config and tokenizer files come from
the local Hugging Face cache (or ``roberta_dir``); nothing is downloaded unless ``DIFFGAP_ALLOW_HUB=1``.
The ~500 MB roberta-base *weights* are never needed: the tower is built from its config and then
overwritten by the checkpoint. Every refusal names the first mismatch.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from diffgap.core.errors import UserError

from .clap_arch import ClapArch, build_clap_model

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
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                         "re-download it") from None
    arch = None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        arch = ckpt.get("diffgap_clap_arch")
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"{path} holds no CLAP state dict (expected {{'state_dict': {{name: tensor}}}}); "
                         "pass a LAION-CLAP checkpoint such as 630k-audioset-best.pt")
    if next(iter(ckpt)).startswith("module."):
        ckpt = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}
    return ckpt, arch


def _infer_arch(sd: dict, path: Path) -> ClapArch:
    """Recover the architecture of a LAION-CLAP checkpoint from its tensor names and shapes."""
    if any(".fusion_model." in k or ".mel_conv2d." in k or ".mel_conv1d." in k for k in sd):
        raise UserError(f"{path} is a feature-fusion CLAP checkpoint; diffgap supports non-fusion ones "
                         "(630k-best.pt, 630k-audioset-best.pt, music_*.pt)")
    key = "audio_branch.patch_embed.proj.weight"
    if key not in sd:
        raise UserError(f"{path} is not an HTS-AT CLAP checkpoint: first missing key {key!r}")
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
    raise UserError(f"{path}: unknown text tower (neither RoBERTa 'text_branch.embeddings.*' nor transformer "
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
            raise UserError(f"{path} does not match CLAP {arch.amodel}+{arch.tmodel}: first missing key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{path} does not match CLAP {arch.amodel}+{arch.tmodel}: {k!r} has shape "
                             f"{tuple(sd[k].shape)} in the checkpoint but {tuple(v.shape)} in the model")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise UserError(f"{path} does not match CLAP {arch.amodel}+{arch.tmodel}: first unexpected key {extra[0]!r}")


def write_clap_checkpoint(model: nn.Module, arch: ClapArch, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights as a LAION-CLAP-style checkpoint (+ its named ``arch``), atomically."""
    from diffgap.core.fsutil import atomic_path

    path = Path(path)
    payload = {"state_dict": model.state_dict(), "diffgap_clap_arch": dataclasses.asdict(arch)}
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
            raise UserError(f"RoBERTa tokenizer has {tokenizer.vocab_size} tokens but its config says "
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
