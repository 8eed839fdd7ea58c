"""CLAP architectures: named laion-clap model configs and building laion-clap's ``CLAP`` from them.

Always the package's own classes, never a copy; the laion-clap internals this needs (HTS-AT sizes,
a RoBERTa tower built from its config) are applied by :mod:`diffgap.encoders.laion_clap_patch` for
the duration of one ``CLAP(...)`` call.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from diffgap.core.errors import UserError

from . import laion_clap_patch as patch


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
        raise UserError(f"unknown CLAP architecture {name!r}; choose one of {sorted(ARCHS)} or pass --checkpoint")
    return ARCHS[name]


def model_cfg(arch: ClapArch) -> dict:
    """laion-clap's model config for ``arch`` with its overrides applied (non-fusion)."""
    cfg = patch.model_config(arch.amodel)
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
    _, _, clap_model_mod = patch.import_laion_clap()
    cfg = model_cfg(arch)
    with torch.random.fork_rng(devices=[]), patch.building_clap(arch.htsat, roberta_config):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            # laion-clap's WindowAttention calls torch.meshgrid without indexing= (harmless: "ij").
            warnings.filterwarnings("ignore", message=".*torch.meshgrid.*")
            model = clap_model_mod.CLAP(**cfg)
    model.eval()
    return model, cfg
