"""The Pipeline API: encoder -> fused DiffGAP sampler. Torch-free.

- :class:`TextToAudioBridge` / :class:`AudioToTextBridge`: raw text / audio (or precomputed CLAP
  embeddings) -> CLAP embedding (B, E) -> the fused sampler ``diffgap_<source>_to_<target>`` ->
  the bridged target-modality embedding (B, D) and the source's own head-space embedding (B, D).
- :class:`VideoToAudioBridge` / :class:`AudioToVideoBridge`: the same for a video<->audio (CAVP-space)
  export: video files (decoded by the torch-free :mod:`diffgap.core.video`) or frame arrays / audio files or
  waveforms -> CAVP embedding -> ``diffgap_video_to_audio`` / ``diffgap_audio_to_video``.
- Gallery search lives in :mod:`.gallery` (the index directory), :mod:`.gallery_build`
  (:func:`build_index`), :mod:`.search` (:class:`AudioSearch`), :mod:`.search_engines` and
  :mod:`.fusion` (the fused score as one inner product); those names are importable from here too.

Reproducibility: the sampler's initial noise comes from :func:`make_noise`, where row b is drawn from
``numpy.random.default_rng(seed_b)``; a query's result therefore depends only on its own input and
seed, never on the batch it was sent with (the Triton models use the same function).
"""
from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from diffgap.core.iospec import ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_PROJECTED
from diffgap.core.manifest import Manifest
from diffgap.core.names import encoder_name, head_name, sampler_name

# The scoring names stay importable from here (they live in .fusion).
from .fusion import DEFAULT_WEIGHTS, EVAL_TERM_NAMES, SCORE_TERMS, TASKS, fuse_scores, fusion_weights, top_k  # noqa: F401
from .session import Session, open_model

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
# The fused sampler's tensor *roles* (keys of its IOSpec's meta["roles"], not tensor names): the
# tensors are looked up by role in the manifest's IOSpec (IOSpec.role), never by a retyped name.
SAMPLER_CONDITION = ROLE_CONDITION    # (B, E) CLAP embedding of the source modality
SAMPLER_NOISE = ROLE_NOISE            # (B, D) initial Gaussian noise
SAMPLER_GUIDANCE = ROLE_GUIDANCE      # optional (B, 1) guidance scale
SAMPLER_BRIDGED = ROLE_BRIDGED        # (B, D) bridged, L2-normalised, target head space
SAMPLER_PROJECTED = ROLE_PROJECTED    # (B, D) the condition's own L2-normalised head-space embedding


def make_noise(seeds: int | Sequence[int] | np.ndarray, batch: int, dim: int) -> np.ndarray:
    """Initial sampler noise ``(batch, dim)`` float32; row b ~ N(0, I) from ``default_rng(seed_b)``.

    ``seeds`` is one int (used for every row) or one int per row.
    """
    s = np.asarray(seeds, dtype=np.int64)
    if s.ndim == 0:
        s = np.full(batch, int(s), dtype=np.int64)
    if s.shape != (batch,):
        raise ValueError(f"seeds must be one int or {batch} ints, got shape {s.shape}")
    if (s < 0).any():
        raise ValueError("seeds must be non-negative integers")
    out = np.empty((batch, dim), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for b, seed in enumerate(s.tolist()):
        if seed not in cache:
            cache[seed] = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
        out[b] = cache[seed]
    return out


def check_embeddings(name: str, x: Any, dim: int, error: type[Exception] = ValueError) -> np.ndarray:
    """``x`` as float32 ``(N, dim)``, or ``error`` naming the problem (shape, dtype, first NaN/Inf row).

    The finiteness scan runs in blocks of 64k rows so a catalogue-sized gallery is never copied whole.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise error(f"{name} must be (N, {dim}), got shape {x.shape}; use embeddings of this model's CLAP space")
    if x.dtype.kind != "f":
        raise error(f"{name} must be floating point, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    for a in range(0, len(x), 1 << 16):
        bad = ~np.isfinite(x[a:a + (1 << 16)])
        if bad.any():
            raise error(f"{name} contains NaN/Inf (first at row {a + int(np.argwhere(bad)[0][0])}); clean the input")
    return x


def _batches(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@dataclass
class BridgeResult:
    """``source``: the CLAP embeddings (B, E) as bridged (encoder outputs are L2-normalised);
    ``projected``: their L2-normalised head-space embeddings (B, D); ``bridged``: the sampler's
    L2-normalised target-modality embeddings (B, D). All float32; :meth:`Bridge.embed` leaves the
    fields it was not asked for None."""

    source: np.ndarray | None      # None only where a caller (the Triton search) was not sent it
    projected: np.ndarray | None
    bridged: np.ndarray | None


EMBEDDINGS = ("source", "projected", "bridged")   # BridgeResult's fields, what Bridge.embed may be asked for


# ----------------------------------------------------------------------------------------------
# bridges
# ----------------------------------------------------------------------------------------------
class Bridge(abc.ABC):
    """Encoder -> fused sampler for one direction ``source -> target`` of an export directory."""

    source = ""
    target = ""
    family = "clap"   # the contrastive encoders of the export (export names clap_* / cavp_*)

    def __init__(
        self,
        export_dir: str | os.PathLike | Manifest,
        backend: str = "ort-cpu",
        precision: str = "fp32",
        *,
        seed: int = DEFAULT_SEED,
        guidance_scale: float | None = None,
        verify: bool = True,
        **session_options: Any,
    ) -> None:
        self.manifest = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
        self.backend, self.precision = backend, precision
        self.seed = int(seed)
        self.guidance_scale = guidance_scale
        self._verify = verify
        if backend.startswith("ort-"):
            # Encoder and sampler take turns: a spinning idle pool would steal the busy one's cores
            # (the ``no-spin`` rows of ``python -m benchmarks --only knobs`` compare the two settings).
            session_options = {"spin_wait": False, **session_options}
        self._session_options = session_options
        # The sampler and the head are opened on first use: a caller that needs neither (fusion weights
        # with both bridged terms at 0 read only the head, or only the raw embedding) never loads them.
        self._sampler: Session | None = None
        self._head: Session | None = None
        io = self.manifest.model(sampler_name(self.source, self.target)).io
        # io.role raises a one-line "re-export" error for exports without (or with incomplete) roles.
        self._condition, self._noise = io.role(SAMPLER_CONDITION), io.role(SAMPLER_NOISE)
        self._bridged, self._projected = io.role(SAMPLER_BRIDGED), io.role(SAMPLER_PROJECTED)
        self.embed_dim = self._condition.feature_shape[0]   # E
        self.head_dim = self._noise.feature_shape[0]        # D
        if self.embed_dim != self.manifest.input_dim(self.source):
            raise ValueError(f"{io.name}: condition dim {self.embed_dim} != the export's {self.source} width "
                             f"{self.manifest.input_dim(self.source)}; re-export")
        self._encoder: Session | None = None

    def _open(self, name: str) -> Session:
        return open_model(self.manifest, name, self.backend, self.precision, verify=self._verify, **self._session_options)

    @property
    def sampler(self) -> Session:
        """The fused sampler ``diffgap_<source>_to_<target>``, opened on first use."""
        if self._sampler is None:
            self._sampler = self._open(sampler_name(self.source, self.target))
        return self._sampler

    @property
    def has_head(self) -> bool:
        """Whether the export holds the source's head alone (exports before it existed do not)."""
        return head_name(self.source) in self.manifest.models

    @property
    def head(self) -> Session:
        """The source modality's contrastive head alone (``<source>_head``), opened on first use."""
        if self._head is None:
            self._head = self._open(head_name(self.source))
        return self._head

    @property
    def encoder(self) -> Session:
        """The source modality's encoder, opened on first use (embedding-only callers never load it)."""
        if self._encoder is None:
            self._encoder = open_model(
                self.manifest, encoder_name(self.source, self.family), self.backend, self.precision, verify=self._verify, **self._session_options
            )
        return self._encoder

    def bridge_embeddings(
        self,
        condition: np.ndarray,
        seed: int | Sequence[int] | None = None,
        noise: np.ndarray | None = None,
        guidance_scale: float | None = None,
    ) -> BridgeResult:
        """Bridge CLAP embeddings ``condition (B, E)``; batches above the sampler's max are chunked."""
        cond = check_embeddings("condition", condition, self.embed_dim)
        B = cond.shape[0]
        if B == 0:
            raise ValueError("no inputs to bridge")
        if noise is None:
            noise = make_noise(self.seed if seed is None else seed, B, self.head_dim)
        elif noise.shape != (B, self.head_dim) or noise.dtype != np.float32:
            raise ValueError(f"noise must be float32 ({B}, {self.head_dim}), got {noise.dtype}{list(noise.shape)}")
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        io = self.sampler.io
        projected = np.empty((B, self.head_dim), np.float32)
        bridged = np.empty((B, self.head_dim), np.float32)
        for sl in _batches(B, io.max_batch):
            feeds = {self._condition.name: cond[sl], self._noise.name: np.ascontiguousarray(noise[sl])}
            if g is not None:
                if not io.has_role(SAMPLER_GUIDANCE):
                    raise ValueError(f"{io.name} was exported without a guidance input; re-export with guidance or drop guidance_scale")
                spec = io.role(SAMPLER_GUIDANCE)
                feeds[spec.name] = np.full(spec.concrete(sl.stop - sl.start), g, dtype=spec.np_dtype)
            out = self.sampler.infer(feeds)
            bridged[sl] = out[self._bridged.name]
            projected[sl] = out[self._projected.name]
        return BridgeResult(source=cond, projected=projected, bridged=bridged)

    def project(self, condition: np.ndarray) -> np.ndarray:
        """Embeddings ``condition (B, E)`` -> their L2-normalised head-space embeddings (B, D), with the
        head alone (no sampler call). The sampler's ``projected`` output is the same function."""
        cond = check_embeddings("condition", condition, self.embed_dim)
        io = self.head.io
        c, p = io.role(SAMPLER_CONDITION).name, io.role(SAMPLER_PROJECTED).name
        out = np.empty((cond.shape[0], self.head_dim), np.float32)
        for sl in _batches(cond.shape[0], io.max_batch):
            out[sl] = self.head.infer({c: cond[sl]})[p]
        return out

    def embed(self, condition: np.ndarray, needs: Iterable[str] = EMBEDDINGS, seed: int | Sequence[int] | None = None,
              guidance_scale: float | None = None) -> BridgeResult:
        """What ``needs`` lists of :data:`EMBEDDINGS`, computed at the least cost; the other fields are None.

        ``bridged`` runs the sampler (which gives ``projected`` too); ``projected`` alone runs the head
        (the sampler where the export has no head model); ``source`` alone runs nothing.
        (:func:`diffgap.runtime.fusion.query_needs` says what a set of fusion weights needs.)
        """
        needs = set(needs)
        if needs - set(EMBEDDINGS):
            raise ValueError(f"unknown embeddings {sorted(needs - set(EMBEDDINGS))}; ask for some of {EMBEDDINGS}")
        if "bridged" in needs or ("projected" in needs and not self.has_head):
            r = self.bridge_embeddings(condition, seed=seed, guidance_scale=guidance_scale)
            return BridgeResult(r.source, r.projected, r.bridged if "bridged" in needs else None)
        cond = check_embeddings("condition", condition, self.embed_dim)
        if len(cond) == 0:
            raise ValueError("no inputs to embed")
        return BridgeResult(cond, self.project(cond) if "projected" in needs else None, None)

    @abc.abstractmethod
    def encode(self, inputs: Any) -> np.ndarray:
        """Raw inputs -> CLAP embeddings (B, E) float32 (one implementation per source modality)."""

    def __call__(self, inputs: Any, seed: int | Sequence[int] | None = None, guidance_scale: float | None = None) -> BridgeResult:
        return self.bridge_embeddings(self.encode(inputs), seed=seed, guidance_scale=guidance_scale)

    def _run_encoder(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        enc = self.encoder
        n = len(next(iter(feeds.values())))
        out_name = enc.io.output_names[0]
        parts = [enc.infer({k: v[sl] for k, v in feeds.items()})[out_name] for sl in _batches(n, enc.io.max_batch)]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    def close(self) -> None:
        for s in (self._sampler, self._head, self._encoder):
            if s is not None:
                s.close()

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TextToAudioBridge(Bridge):
    """Captions -> CLAP text embeddings -> bridged audio head-space embeddings."""

    source, target = "text", "audio"

    _tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the text encoder declares (``io.meta["tokenizer"]``), loaded from the export's
        ``tokenizer`` asset (laion-clap's BPE vocab or RoBERTa's tokenizer.json)."""
        if self._tokenizer is None:
            from diffgap.core.tokenizer import context_length, load_tokenizer

            kind = self.encoder.io.meta.get("tokenizer")
            if not kind:
                raise ValueError(f"{self.encoder.name} declares no tokenizer in its I/O metadata; re-export")
            asset = self.manifest.asset("tokenizer")
            self._tokenizer = load_tokenizer(kind, asset.parent if kind == "roberta" and asset.is_file() else asset,
                                             context_length(self.encoder.io))
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Captions -> the text encoder's feeds (token ids, and a mask where the encoder declares one)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        if not texts:
            raise ValueError("no texts given")
        if any(not t.strip() for t in texts):
            raise ValueError("empty caption in texts; every query needs some text")
        return self.tokenizer.feeds(list(texts), self.encoder.io)  # keyed by the encoder's declared roles

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._run_encoder(self.tokenize(texts))


class AudioToTextBridge(Bridge):
    """Audio (file paths, or waveforms already prepared by :func:`diffgap.core.audio.prepare_clips`) ->
    CLAP audio embeddings -> bridged text head-space embeddings."""

    source, target = "audio", "text"

    def waveforms(self, inputs: Sequence[str | os.PathLike] | np.ndarray, long_clip: str = "center") -> np.ndarray:
        """(B, samples) float32 CLAP inputs; paths are decoded with diffgap.core.audio's laion-clap data path."""
        spec = self.encoder.io.inputs[0]
        if isinstance(inputs, np.ndarray):
            if inputs.ndim != 2 or inputs.shape[1:] != spec.feature_shape:
                raise ValueError(
                    f"waveforms must be (B, {spec.feature_shape[0]}) prepared with diffgap.core.audio.prepare_clips, got {inputs.shape}"
                )
            return inputs.astype(np.float32, copy=False)
        from diffgap.core import audio

        if long_clip == "chunks":
            raise ValueError("long_clip='chunks' gives several windows per file; use 'center' or 'start' here")
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if not inputs:
            raise ValueError("no audio given")
        return np.concatenate([audio.load_clips(p, long_clip=long_clip) for p in inputs], axis=0).astype(np.float32)

    def encode(self, inputs: Sequence[str | os.PathLike] | np.ndarray) -> np.ndarray:
        wav = self.waveforms(inputs)
        return self._run_encoder({self.encoder.io.inputs[0].name: wav})


class _CavpBridge(Bridge):
    family = "cavp"

    def cavp_config(self) -> dict[str, Any]:
        """The CAVP front-end settings the encoder was exported with (its IOSpec ``meta["cavp_config"]``)."""
        cfg = self.encoder.io.meta.get("cavp_config")
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{self.encoder.name} declares no cavp_config in its I/O metadata; re-export with `diffgap export`")
        return dict(cfg)


def _paths(inputs: Any, what: str) -> list[str | os.PathLike]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError(f"no {what} given")
    if not all(isinstance(p, (str, os.PathLike)) for p in inputs):
        raise ValueError(f"{what} must be file paths or one numpy array")
    return inputs


class VideoToAudioBridge(_CavpBridge):
    """Videos (file paths, or frame arrays) -> CAVP video embeddings -> bridged audio head-space embeddings."""

    source, target = "video", "audio"

    def frames(self, inputs: Sequence[str | os.PathLike] | np.ndarray, start: float = 0.0, resize: str = "squash") -> np.ndarray:
        """(B, T, 3, S, S) float32 in [0, 1], the video encoder's input.

        Arrays: float in [0, 1] or uint8 (divided by 255), exactly the declared (B, T, 3, S, S).
        Paths: decoded with :func:`diffgap.core.video.load_frames` at the exported fps / size / frame count
        from ``start`` seconds (``resize``: ``"squash"``, Diff-Foley's, or ``"center_crop"``).
        """
        spec = self.encoder.io.inputs[0]
        if isinstance(inputs, np.ndarray):
            if inputs.ndim != 1 + len(spec.feature_shape) or inputs.shape[1:] != spec.feature_shape:
                raise ValueError(
                    f"frames must be (B, {', '.join(map(str, spec.feature_shape))}) (T, RGB, H, W), got {inputs.shape}; "
                    "decode videos with diffgap.core.video.load_frames or pass file paths"
                )
            if inputs.dtype == np.uint8:
                return (inputs.astype(np.float32) / 255.0).astype(spec.np_dtype, copy=False)
            if inputs.dtype.kind != "f":
                raise ValueError(f"frames must be float in [0, 1] or uint8, got {inputs.dtype}")
            return inputs.astype(spec.np_dtype, copy=False)
        from diffgap.core import video

        c = self.cavp_config()
        clips = [
            video.load_frames(p, fps=float(c["fps"]), size=int(c["image_size"]), num_frames=int(c["num_frames"]),
                              start=start, resize=resize)
            for p in _paths(inputs, "videos")
        ]
        return (np.stack(clips).astype(np.float32) / 255.0).astype(spec.np_dtype, copy=False)

    def encode(self, inputs: Sequence[str | os.PathLike] | np.ndarray) -> np.ndarray:
        return self._run_encoder({self.encoder.io.inputs[0].name: self.frames(inputs)})


class AudioToVideoBridge(_CavpBridge):
    """Audio (file paths -- audio files or videos with sound -- or prepared waveforms) -> CAVP audio
    embeddings -> bridged video head-space embeddings."""

    source, target = "audio", "video"

    def waveforms(self, inputs: Sequence[str | os.PathLike] | np.ndarray, start: float = 0.0) -> np.ndarray:
        """(B, clip_samples) float32 at the exported sample rate, the audio encoder's input.

        Arrays are taken as prepared. Paths are decoded with :func:`diffgap.core.video.load_audio_track`
        (PyAV: audio files and the first audio stream of a video), mono, resampled, from ``start``
        seconds; the first ``clip_samples`` are kept and shorter clips zero-padded at the end
        (Diff-Foley's ``wav2spec`` policy, as :meth:`diffgap.encoders.cavp.CavpEncoder.prepare_audio`).
        """
        spec = self.encoder.io.inputs[0]
        if isinstance(inputs, np.ndarray):
            if inputs.ndim != 2 or inputs.shape[1:] != spec.feature_shape:
                raise ValueError(
                    f"waveforms must be (B, {spec.feature_shape[0]}) mono at the encoder's sample rate, got {inputs.shape}; "
                    "pass file paths to decode and fit them"
                )
            if inputs.dtype.kind != "f":
                raise ValueError(f"waveforms must be floating point, got {inputs.dtype}")
            return inputs.astype(spec.np_dtype, copy=False)
        from diffgap.core import video

        c = self.cavp_config()
        n, sr = spec.feature_shape[0], int(c["sample_rate"])
        rows = []
        for p in _paths(inputs, "audio"):
            x = video.load_audio_track(p, sample_rate=sr, start=start, duration=n / sr)
            row = np.zeros(n, np.float32)
            row[: min(n, x.size)] = x[:n]
            rows.append(row)
        return np.stack(rows).astype(spec.np_dtype, copy=False)

    def encode(self, inputs: Sequence[str | os.PathLike] | np.ndarray) -> np.ndarray:
        return self._run_encoder({self.encoder.io.inputs[0].name: self.waveforms(inputs)})


# The index and search moved to .gallery, .gallery_build and .search (which import the bridges from
# here); their names stay importable from this module.
_MOVED = {"AudioSearch": ".search", "GallerySearcher": ".search", "GalleryIndex": ".gallery", "SearchError": ".gallery",
          "INDEX_FORMAT": ".gallery", "build_index": ".gallery_build"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
