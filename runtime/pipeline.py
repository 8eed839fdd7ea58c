"""The Pipeline API: encoder -> fused DiffGAP sampler, and gallery search. Torch-free.

- :class:`TextToAudioBridge` / :class:`AudioToTextBridge`: raw text / audio (or precomputed CLAP
  embeddings) -> CLAP embedding (B, E) -> the fused sampler ``diffgap_<source>_to_<target>`` ->
  the bridged target-modality embedding (B, D) and the source's own head-space embedding (B, D).
- :class:`VideoToAudioBridge` / :class:`AudioToVideoBridge`: the same for a video<->audio (CAVP-space)
  export: video files (decoded by the torch-free :mod:`diffgap.core.video`) or frame arrays / audio files or
  waveforms -> CAVP embedding -> ``diffgap_video_to_audio`` / ``diffgap_audio_to_video``.
- :class:`AudioSearch`: a gallery index file (audio embeddings + ids, and the gallery-side bridged
  embeddings computed once at index time) answering text queries with audio ids, and audio queries
  with captions.

Reproducibility: the sampler's initial noise comes from :func:`make_noise`, where row b is drawn from
``numpy.random.default_rng(seed_b)``; a query's result therefore depends only on its own input and
seed, never on the batch it was sent with (the Triton models use the same function).

Scoring is ``diffgap evaluate``'s ``full`` system (issue 2, "retrieval with bridging"): for a query q
of modality s against gallery items g of modality t, with raw CLAP embeddings x, head-space
projections h and bridged embeddings b, four cosine matrices ::

    raw = cos(x_q, x_g)   head = cos(h_q, h_g)   query_bridge = cos(b_{s->t}(q), h_g)   gallery_bridge = cos(h_q, b_{t->s}(g))

are z-scored per query over the gallery and summed with weights (``diffgap.core.retrieval.fuse``, the
very function the evaluation uses). The weights come from the export manifest's
``extra["fusion_weights"]`` when present (per task ``text_to_audio`` / ``audio_to_text``, or one set
for both; ``diffgap evaluate``'s component names are accepted), else :data:`DEFAULT_WEIGHTS`.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from diffgap.core.fsutil import atomic_path
from diffgap.core.iospec import ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, ROLE_PROJECTED
from diffgap.core.manifest import Manifest
from diffgap.core.names import encoder_name, sampler_name
from diffgap.core.retrieval import cosine, fuse  # numpy-only: the evaluation's own scoring


from .session import Session, open_model

log = logging.getLogger(__name__)

INDEX_FORMAT = "diffgap-index/1"
DEFAULT_SEED = 0
# The fused sampler's tensor *roles* (keys of its IOSpec's meta["roles"], not tensor names): the
# tensors are looked up by role in the manifest's IOSpec (IOSpec.role), never by a retyped name.
SAMPLER_CONDITION = ROLE_CONDITION    # (B, E) CLAP embedding of the source modality
SAMPLER_NOISE = ROLE_NOISE            # (B, D) initial Gaussian noise
SAMPLER_GUIDANCE = ROLE_GUIDANCE      # optional (B, 1) guidance scale
SAMPLER_BRIDGED = ROLE_BRIDGED        # (B, D) bridged, L2-normalised, target head space
SAMPLER_PROJECTED = ROLE_PROJECTED    # (B, D) the condition's own L2-normalised head-space embedding
SCORE_TERMS = ("raw", "head", "query_bridge", "gallery_bridge")
# diffgap evaluate's names for the same components (diffgap/evaluate.py similarity_sets)
EVAL_TERM_NAMES = {"raw": "raw", "heads": "head", "q-bridge src": "query_bridge", "q-bridge noise": "query_bridge",
                   "g-bridge src": "gallery_bridge", "g-bridge noise": "gallery_bridge"}
TASKS = ("text_to_audio", "audio_to_text")
# Equal weights: a neutral default when the export carries no validated fusion weights.
DEFAULT_WEIGHTS = {k: 0.25 for k in SCORE_TERMS}


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


def _check_embeddings(name: str, x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must be (N, {dim}), got shape {x.shape}; use embeddings of this model's CLAP space")
    if x.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise ValueError(f"{name} contains NaN/Inf (first at row {row}); clean the input")
    return x


def _batches(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@dataclass
class BridgeResult:
    """``source``: the CLAP embeddings (B, E) as bridged (encoder outputs are L2-normalised);
    ``projected``: their L2-normalised head-space embeddings (B, D); ``bridged``: the sampler's
    L2-normalised target-modality embeddings (B, D). All float32."""

    source: np.ndarray
    projected: np.ndarray
    bridged: np.ndarray


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
            # (measured, text->audio on 2 cores: p90 8.1 -> 3.7 ms, p50 3.8 -> 3.4 ms).
            session_options = {"spin_wait": False, **session_options}
        self._session_options = session_options
        self.sampler: Session = open_model(
            self.manifest, sampler_name(self.source, self.target), backend, precision, verify=verify, **session_options
        )
        io = self.sampler.io
        # io.role raises a one-line "re-export" error for exports without (or with incomplete) roles.
        self._condition, self._noise = io.role(SAMPLER_CONDITION), io.role(SAMPLER_NOISE)
        self._bridged, self._projected = io.role(SAMPLER_BRIDGED), io.role(SAMPLER_PROJECTED)
        self.embed_dim = self._condition.feature_shape[0]   # E
        self.head_dim = self._noise.feature_shape[0]        # D
        if self.embed_dim != self.manifest.embed_dim:
            raise ValueError(f"{io.name}: condition dim {self.embed_dim} != export embed_dim {self.manifest.embed_dim}; re-export")
        self._encoder: Session | None = None

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
        cond = _check_embeddings("condition", condition, self.embed_dim)
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
        self.sampler.close()
        if self._encoder is not None:
            self._encoder.close()

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


# ----------------------------------------------------------------------------------------------
# the gallery index
# ----------------------------------------------------------------------------------------------
def _model_identity(man: Manifest, head_dim: int) -> dict[str, Any]:
    return {
        "checkpoint_sha256": man.checkpoint_sha256,
        "preset": man.preset,
        "embed_dim": man.embed_dim,
        "head_dim": head_dim,
    }


def fusion_weights(man: Manifest, weights: Mapping[str, float] | None = None, task: str = "text_to_audio") -> dict[str, float]:
    """The four fusion weights for ``task``: ``weights`` if given, else the export's, else the default."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if weights is None:
        stored = man.extra.get("fusion_weights", DEFAULT_WEIGHTS)
        weights = stored.get(task, DEFAULT_WEIGHTS) if any(t in stored for t in TASKS) else stored
    w: dict[str, float] = {}
    for k, v in dict(weights).items():
        term = k if k in SCORE_TERMS else EVAL_TERM_NAMES.get(k)
        if term is None:
            raise ValueError(f"unknown score terms [{k!r}]; use {list(SCORE_TERMS)}")
        w[term] = w.get(term, 0.0) + float(v)
    w = {k: w.get(k, 0.0) for k in SCORE_TERMS}
    if not any(w.values()) or any(not np.isfinite(v) for v in w.values()):
        raise ValueError(f"fusion weights must be finite and not all zero, got {w}")
    return w


def build_index(
    export_dir: str | os.PathLike | Manifest,
    out: str | os.PathLike,
    *,
    audio: np.ndarray,
    ids: Sequence[str] | np.ndarray,
    captions: Sequence[str] | np.ndarray | None = None,
    text: np.ndarray | None = None,
    caption_ids: Sequence[str] | np.ndarray | None = None,
    backend: str = "ort-cpu",
    precision: str = "fp32",
    seed: int = DEFAULT_SEED,
    guidance_scale: float | None = None,
) -> Path:
    """Write a gallery index ``.npz`` atomically.

    ``audio (N, E)``: CLAP audio embeddings of the gallery, ``ids (N,)``. Optionally the caption side
    for audio -> text queries: ``captions (M,)`` with their CLAP text embeddings ``text (M, E)`` (or
    without ``text``, encoded here with the export's text encoder) and ``caption_ids (M,)``.
    Gallery-side bridged embeddings (audio -> text for text queries, text -> audio for audio queries)
    are computed here, once, with ``seed``.
    """
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
    ids = np.asarray(ids).astype(str)
    audio = _check_embeddings("audio", audio, man.embed_dim)
    if ids.shape != (audio.shape[0],):
        raise ValueError(f"ids must be ({audio.shape[0]},) to match audio, got {ids.shape}")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("gallery ids must be unique")
    t0 = time.perf_counter()
    with AudioToTextBridge(man, backend, precision, seed=seed, guidance_scale=guidance_scale) as a2t:
        ga = a2t.bridge_embeddings(audio)
        head_dim = a2t.head_dim
    arrays: dict[str, np.ndarray] = {
        "ids": ids,
        "audio_clap": ga.source,
        "audio_head": ga.projected,
        "audio_bridged": ga.bridged,    # gallery-side: audio bridged into text head space
    }
    if captions is not None or text is not None:
        with TextToAudioBridge(man, backend, precision, seed=seed, guidance_scale=guidance_scale) as t2a:
            if text is None:
                if captions is None:
                    raise ValueError("pass captions (and optionally their CLAP text embeddings)")
                text = t2a.encode(list(np.asarray(captions).astype(str)))
            text = _check_embeddings("text", text, man.embed_dim)
            gt = t2a.bridge_embeddings(text)
        M = text.shape[0]
        cap = np.asarray(captions).astype(str) if captions is not None else np.array([""] * M)
        cid = np.asarray(caption_ids).astype(str) if caption_ids is not None else np.array([str(i) for i in range(M)])
        if cap.shape != (M,) or cid.shape != (M,):
            raise ValueError(f"captions and caption_ids must be ({M},) to match text, got {cap.shape} and {cid.shape}")
        arrays.update({
            "caption_ids": cid, "captions": cap, "text_clap": gt.source,
            "text_head": gt.projected, "text_bridged": gt.bridged,   # caption side bridged into audio head space
        })
    meta = {
        "format": INDEX_FORMAT,
        "model": _model_identity(man, head_dim),
        "seed": int(seed),
        "guidance_scale": guidance_scale,
        "backend": backend,
        "precision": precision,
        "export_dir": str(man.root.resolve()),
        "count": int(audio.shape[0]),
        "captions": int(arrays["caption_ids"].shape[0]) if "caption_ids" in arrays else 0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index_seconds": round(time.perf_counter() - t0, 3),
    }
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    out = Path(out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:  # a file object stops np.savez appending ".npz" to the temp name
            np.savez(f, **arrays)
    log.info("wrote index %s (%d audio, %d captions)", out, meta["count"], meta["captions"])
    return out


@dataclass
class GalleryIndex:
    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GalleryIndex":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"index {path} not found; build it with `diffgap index EXPORT_DIR ... --out {path}`")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path} is not a readable index file ({e}); rebuild it with `diffgap index`") from None
        if "meta" not in arrays:
            raise ValueError(f"{path} is not a diffgap index (no meta); rebuild it with `diffgap index`")
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: index metadata is not valid json ({e}); rebuild it") from None
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected {INDEX_FORMAT!r}; rebuild it with `diffgap index`")
        need = ("ids", "audio_clap", "audio_head", "audio_bridged")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}; rebuild it with `diffgap index`")
        m = meta["model"]
        n = arrays["ids"].shape[0]
        shapes = {"audio_clap": (n, m["embed_dim"]), "audio_head": (n, m["head_dim"]), "audio_bridged": (n, m["head_dim"])}
        if "caption_ids" in arrays:
            c = arrays["caption_ids"].shape[0]
            shapes.update({"text_clap": (c, m["embed_dim"]), "text_head": (c, m["head_dim"]), "text_bridged": (c, m["head_dim"])})
        for k, s in shapes.items():
            if arrays.get(k) is None or arrays[k].shape != s:
                raise ValueError(f"{path}: array {k} has shape {None if arrays.get(k) is None else arrays[k].shape}, expected {s}; rebuild the index")
        return cls(path, meta, arrays)

    @property
    def has_captions(self) -> bool:
        return "caption_ids" in self.arrays

    def check_model(self, man: Manifest, head_dim: int) -> None:
        """Refuse an index made by another model (dim, preset or checkpoint differ)."""
        want = _model_identity(man, head_dim)
        have = self.meta["model"]
        diff = [f"{k} {have.get(k)!r} (index) vs {want[k]!r} (export)" for k in want if have.get(k) != want[k]]
        if diff:
            raise ValueError(f"index {self.path} was built with another model: {'; '.join(diff)}; rebuild it with `diffgap index` for this export")


def fuse_scores(
    query: BridgeResult,
    gallery_clap: np.ndarray,
    gallery_head: np.ndarray,
    gallery_bridged: np.ndarray,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
) -> np.ndarray:
    """Fused scores (Q, N) of bridged queries against a gallery (see the module docstring).

    ``query``: the queries' :class:`BridgeResult`; ``gallery_clap (N, E)``, ``gallery_head (N, D)``,
    ``gallery_bridged (N, D)``: the gallery's raw, head-space and bridged embeddings (an index's
    ``audio_*`` or ``text_*`` arrays). Each cosine matrix is z-scored per query over the gallery,
    then weighted and summed, exactly as ``diffgap evaluate`` fuses them.
    """
    w = {k: float(weights.get(k, 0.0)) for k in SCORE_TERMS}
    sims = {
        "raw": lambda: cosine(query.source, gallery_clap),
        "head": lambda: cosine(query.projected, gallery_head),
        "query_bridge": lambda: cosine(query.bridged, gallery_head),
        "gallery_bridge": lambda: cosine(query.projected, gallery_bridged),
    }
    used = [k for k in SCORE_TERMS if w[k]]
    return fuse([sims[k]() for k in used], tuple(w[k] for k in used))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (Q, k'), scores (Q, k')) of the k best per row, best first, k' = min(k, N); ties
    go to the lower index (stable sort), so results are deterministic."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    idx = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
    return idx, np.take_along_axis(scores, idx, axis=1)


class AudioSearch:
    """Text -> audio search over a gallery index (and audio -> caption search when it has captions).

    ``search(texts, k)`` returns ``(ids (Q, k) str, scores (Q, k) float32)``, best first.
    """

    def __init__(
        self,
        index: str | os.PathLike,
        export_dir: str | os.PathLike | Manifest,
        backend: str = "ort-cpu",
        precision: str = "fp32",
        *,
        seed: int = DEFAULT_SEED,
        weights: Mapping[str, float] | None = None,
        **session_options: Any,
    ) -> None:
        self.manifest = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
        self.index = GalleryIndex.load(index)
        self.weights = fusion_weights(self.manifest, weights, "text_to_audio")
        self.caption_weights = fusion_weights(self.manifest, weights, "audio_to_text")
        gs = self.index.meta.get("guidance_scale")
        self.t2a = TextToAudioBridge(self.manifest, backend, precision, seed=seed, guidance_scale=gs, **session_options)
        self.index.check_model(self.manifest, self.t2a.head_dim)
        self._a2t: AudioToTextBridge | None = None
        self._opts = dict(backend=backend, precision=precision, seed=seed, guidance_scale=gs, **session_options)

    @property
    def a2t(self) -> AudioToTextBridge:
        if self._a2t is None:
            self._a2t = AudioToTextBridge(self.manifest, **self._opts)
        return self._a2t

    # -- text -> audio ----------------------------------------------------------------------
    def score_text_embeddings(self, text: np.ndarray, seed: int | Sequence[int] | None = None) -> np.ndarray:
        """CLAP text embeddings (Q, E) -> fused scores against every gallery audio (Q, N)."""
        q = self.t2a.bridge_embeddings(text, seed=seed)  # as given, like diffgap evaluate
        a = self.index.arrays
        return fuse_scores(q, a["audio_clap"], a["audio_head"], a["audio_bridged"], self.weights)

    def search_embeddings(self, text: np.ndarray, k: int = 10, seed: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CLAP text embeddings (Q, E) -> (ids (Q, k), scores (Q, k)), best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        idx, scores = top_k(self.score_text_embeddings(text, seed), k)
        return self.index.arrays["ids"][idx], scores

    def search(self, texts: Sequence[str], k: int = 10, seed: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids (Q, k), scores (Q, k)) of the best-matching gallery audio."""
        return self.search_embeddings(self.t2a.encode(texts), k, seed)

    # -- audio -> captions ------------------------------------------------------------------
    def _require_captions(self) -> None:
        if not self.index.has_captions:
            raise ValueError(f"index {self.index.path} has no captions; rebuild it with captions (`diffgap index --npz` with a text array)")

    def score_audio_embeddings(self, audio: np.ndarray, seed: int | Sequence[int] | None = None) -> np.ndarray:
        self._require_captions()
        q = self.a2t.bridge_embeddings(audio, seed=seed)
        a = self.index.arrays
        return fuse_scores(q, a["text_clap"], a["text_head"], a["text_bridged"], self.caption_weights)

    def search_captions_embeddings(self, audio: np.ndarray, k: int = 10, seed: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CLAP audio embeddings -> (caption ids, captions, scores), each (Q, k)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        idx, scores = top_k(self.score_audio_embeddings(audio, seed), k)
        a = self.index.arrays
        return a["caption_ids"][idx], a["captions"][idx], scores

    def search_captions(self, audio: Sequence[str | os.PathLike] | np.ndarray, k: int = 10, seed: int | Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Audio files (or prepared waveforms) -> (caption ids, captions, scores), each (Q, k)."""
        self._require_captions()
        return self.search_captions_embeddings(self.a2t.encode(audio), k, seed)

    def close(self) -> None:
        self.t2a.close()
        if self._a2t is not None:
            self._a2t.close()

    def __enter__(self) -> "AudioSearch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
