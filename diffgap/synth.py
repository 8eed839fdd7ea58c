"""A seeded synthetic stand-in for CLAP embeddings of AudioCaps, in a *CLAP-like* regime. numpy only.

Both modalities already live in one aligned 512-d space (as after contrastive pre-training); what
is left to bridge is what a linear map cannot fix. Per item i and modality m (text / audio):

    s_i      ~ N(0, I_k)                                   shared semantic factors (k = ``semantic_dim``)
    u_i      = A s_i / sqrt(k)                             A: (E, k) orthonormal columns, shared by both modalities
    p_i^m    ~ N(0, I_p),  P^m (E, p) orthonormal          private factors, inside the same space
    d^m(s)   = W2^m He2(W1^m s / sqrt(k)) / sqrt(2 h)      nonlinear distortion, He2(z) = z^2 - 1 is the second
                                                           Hermite polynomial: E[He2(z) z] = 0 for z ~ N(0, 1),
                                                           so d^m has no linear component in s
    x_i^m    = normalise(u_i + a_p P^m p_i^m / sqrt(p) + a_d d^m(s_i) + g^m + a_n n_i^m / sqrt(E))
               g^m: modality-gap offset, +-gap/2 along one fixed unit vector; n ~ N(0, I_E)

Captions are drawn from a small template grammar keyed on the two largest semantic factors, so
they are readable but carry no extra signal.

Calibration (on the 1,000-pair test split): raw-cosine text-to-audio R@1 in [15%, 35%],
and a linear contrastive adapter trained on the train split gains at most 15 points. The defaults
below were fixed once by :func:`calibration_report` (``diffgap synth --calibrate``) before any
DiffGAP model was trained on them and are not tuned toward any method. Measured values are in
the README (``diffgap synth --calibrate`` prints them); tests/test_synth.py checks the properties
the design relies on (the formula above, no linear component in the distortion, each nuisance
lowering recall, a linear adapter not undoing the distortion).

The video-audio benchmark (CAVP space) is this same generator with its arrays named
``video``/``audio`` and its own seed (:data:`VIDEO_AUDIO_CONFIG`, what ``diffgap synth --modalities
video-audio`` writes); no parameter was changed or tuned for it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .core.data import MODALITY_KEYS, Pairs, save_pairs
from .core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthConfig:
    embed_dim: int = 512          # E: CLAP's joint embedding dim (laion-clap HTSAT/RoBERTa heads)
    semantic_dim: int = 64        # k: shared semantic factors (the shared subspace span(A))
    private_dim: int = 32         # p: per-modality private factors, a p-dim subspace of span(A)
    distortion_hidden: int = 256  # h: width of the Hermite-2 distortion
    private_scale: float = 0.95   # a_p
    distortion_scale: float = 0.95  # a_d
    inner_noise_scale: float = 0.6  # a_s: isotropic noise inside the semantic subspace
    noise_scale: float = 0.3      # a_n: isotropic noise in the full E-d space
    gap: float = 0.8              # distance between the two modality-gap offsets
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000            # the calibration band is stated on 1,000 test pairs
    seed: int = 0


_SOUNDS = ["a dog barks", "rain falls", "an engine idles", "birds chirp", "a crowd cheers", "water runs",
           "a bell rings", "wind blows", "a man speaks", "a baby cries", "music plays", "a door slams"]
_PLACES = ["in the distance", "nearby", "indoors", "outside", "on a street", "in a forest", "in a hall", "by a river"]

TEXT_AUDIO = ("text", "audio")
VIDEO_AUDIO = ("video", "audio")
# The video-audio benchmark (CAVP space): the same generator and parameters as the
# text-audio one, only its own seed; nothing in it was tuned toward any method.
VIDEO_AUDIO_CONFIG = SynthConfig(seed=1)


class _Modality:
    def __init__(self, cfg: SynthConfig, rng: np.random.Generator, sign: float, gap_dir: np.ndarray):
        E = cfg.embed_dim
        k = cfg.semantic_dim
        # Private factors and the distortion live *inside* the shared semantic subspace span(A)
        # (coordinates w.r.t. A), so no linear projection can remove them without removing meaning.
        self.Q = np.linalg.qr(rng.standard_normal((k, cfg.private_dim)))[0]         # (k, p)
        self.W1 = rng.standard_normal((cfg.distortion_hidden, k))                  # (h, k)
        self.W2 = rng.standard_normal((k, cfg.distortion_hidden)) / np.sqrt(k)      # (k, h): unit-norm-ish columns
        self.offset = sign * 0.5 * cfg.gap * gap_dir                                # (E,)


class SynthGenerator:
    """Holds the fixed random maps of one benchmark; ``sample(n, rng)`` draws n paired items.

    ``modalities`` only names the two arrays (``("video", "audio")`` for the video-audio benchmark);
    the generator draws exactly the same random maps in the same order whatever the names.
    """

    def __init__(self, cfg: SynthConfig, modalities: tuple[str, str] = TEXT_AUDIO):
        a, b = modalities
        if a == b or not {a, b} <= set(MODALITY_KEYS):
            raise UserError(f"modalities must be two distinct names of {MODALITY_KEYS}, got {modalities}")
        self.cfg = cfg
        self.modalities = (a, b)
        rng = np.random.default_rng(cfg.seed)
        E = cfg.embed_dim
        self.A = np.linalg.qr(rng.standard_normal((E, cfg.semantic_dim)))[0]  # (E, k)
        gap_dir = rng.standard_normal(E)
        gap_dir /= np.linalg.norm(gap_dir)
        self.mods = {a: _Modality(cfg, rng, -1.0, gap_dir), b: _Modality(cfg, rng, +1.0, gap_dir)}

    def distortion(self, m: str, s: np.ndarray) -> np.ndarray:
        """Modality ``m``'s nonlinear distortion of the semantic factors s (n, k) -> (n, k), E||.||^2 ~ 1.

        The second Hermite polynomial He2(z) = z^2 - 1 of z ~ N(0, 1) is uncorrelated with z, so the
        distortion has no linear component in s: no linear map can undo it.
        """
        M = self.mods[m]
        z = s @ M.W1.T / np.sqrt(self.cfg.semantic_dim)                             # (n, h), each ~N(0, 1)
        return (z**2 - 1.0) @ M.W2.T / np.sqrt(2.0 * self.cfg.distortion_hidden)

    def _embed(self, m: str, s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        M = self.mods[m]
        n = len(s)
        k = c.semantic_dim
        u = s / np.sqrt(k)                                                          # (n, k), E||u||^2 = 1
        priv = rng.standard_normal((n, c.private_dim)) @ M.Q.T / np.sqrt(c.private_dim)  # (n, k), E||.||^2 = 1
        inner = u + c.private_scale * priv + c.distortion_scale * self.distortion(m, s) + c.inner_noise_scale * rng.standard_normal((n, k)) / np.sqrt(k)
        noise = rng.standard_normal((n, c.embed_dim)) / np.sqrt(c.embed_dim)        # (n, E), E||.||^2 = 1
        x = inner @ self.A.T + M.offset + c.noise_scale * noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator, prefix: str) -> Pairs:
        s = rng.standard_normal((n, self.cfg.semantic_dim))
        emb = {m: self._embed(m, s, rng) for m in self.modalities}
        top = np.argsort(-np.abs(s[:, :24]), axis=1)[:, :2]
        caps = np.array([f"{_SOUNDS[a % 12]} {_PLACES[b % 8]}" for a, b in top]) if "text" in emb else None
        ids = np.array([f"{prefix}-{i:06d}" for i in range(n)])
        return Pairs(emb, ids, caps, prefix)


def generate(cfg: SynthConfig = SynthConfig(), modalities: tuple[str, str] = TEXT_AUDIO) -> dict[str, Pairs]:
    """The three splits ``train``/``val``/``test``, each from its own child seed."""
    gen = SynthGenerator(cfg, modalities)
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    return {
        split: gen.sample(n, np.random.default_rng(ss), split)
        for split, n, ss in zip(("train", "val", "test"), (cfg.n_train, cfg.n_val, cfg.n_test), seeds)
    }


def write(out_dir: str | Path, cfg: SynthConfig = SynthConfig(), modalities: tuple[str, str] = TEXT_AUDIO) -> dict[str, Path]:
    """Write ``train.npz``, ``val.npz``, ``test.npz`` and ``synth.json`` (the parameters) to ``out_dir``."""
    from .core.fsutil import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, p in generate(cfg, modalities).items():
        paths[split] = save_pairs(out / f"{split}.npz", ids=p.ids, captions=p.captions, **p.embeddings)
    atomic_write_json(out / "synth.json", {"generator": "diffgap.synth", "params": asdict(cfg),
                                           "modalities": list(modalities)})
    return paths


# ---- calibration ------------------------------------------------------------------------------
def recall_at_1(queries: np.ndarray, gallery: np.ndarray) -> float:
    """Fraction of queries whose own pair (same row) is the top cosine match. (N, E) each."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ g.T, axis=1) == np.arange(len(q))))


def linear_adapter_r1(train: Pairs, test: Pairs, steps: int = 600, batch: int = 512, seed: int = 0,
                      modalities: tuple[str, str] = TEXT_AUDIO) -> float:
    """First-to-second (text-to-audio) R@1 of a linear contrastive adapter (one E x E affine map per
    modality, symmetric InfoNCE, learnable temperature) trained on ``train`` -- the calibration yardstick."""
    src, tgt = modalities
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    E = train.embed_dim
    lin = {m: torch.nn.Linear(E, E) for m in (src, tgt)}
    for layer in lin.values():
        torch.nn.init.eye_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = [p for layer in lin.values() for p in layer.parameters()] + [logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    X = {m: torch.from_numpy(train[m]) for m in (src, tgt)}
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        t = F.normalize(lin[src](X[src][idx]), dim=-1)
        a = F.normalize(lin[tgt](X[tgt][idx]), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * t @ a.T
        y = torch.arange(batch)
        loss = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        t = lin[src](torch.from_numpy(test[src])).numpy()
        a = lin[tgt](torch.from_numpy(test[tgt])).numpy()
    return recall_at_1(t, a)


def calibration_report(cfg: SynthConfig = SynthConfig(), adapter: bool = True,
                       modalities: tuple[str, str] = TEXT_AUDIO) -> dict[str, float]:
    """Raw and linear-adapter first-to-second R@1 on the test split, in percent (keys ``t2a`` for
    text->audio, ``v2a`` for video->audio)."""
    src, tgt = modalities
    key = f"{src[0]}2{tgt[0]}"
    splits = generate(cfg, modalities)
    rep = {f"raw_{key}_r1": 100 * recall_at_1(splits["test"][src], splits["test"][tgt])}
    if adapter:
        rep[f"linear_adapter_{key}_r1"] = 100 * linear_adapter_r1(splits["train"], splits["test"], modalities=modalities)
        rep["adapter_gain"] = rep[f"linear_adapter_{key}_r1"] - rep[f"raw_{key}_r1"]
    return rep
