"""Gallery search: bridged queries -> U(q) -> the index's engine -> ids and fused scores.

:class:`GallerySearcher` is one side of an index with its engine (what the CLI, :class:`AudioSearch`
and the Triton ``audio_gallery_search`` model all call); :class:`AudioSearch` adds the bridges, so
it answers captions with audio ids and audio with captions.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from diffgap.core.manifest import Manifest

from .fusion import fusion_weights, gallery_spaces, query_needs, query_vectors
from .gallery import GalleryIndex, SearchError
from .pipeline import DEFAULT_SEED, AudioToTextBridge, BridgeResult, TextToAudioBridge
from .search_engines import open_engine


class GallerySearcher:
    """Side ``"audio"`` (text queries) or ``"text"`` (audio queries, captions) of ``index`` and its engine.

    ``engine_options``: passed to the engine (``uri=`` points a ``milvus`` index at another server).
    """

    def __init__(self, index: GalleryIndex, side: str, weights: Mapping[str, float], **engine_options: Any) -> None:
        self.index = index
        self.side = index.side(side)
        self.weights = dict(weights)
        self.engine = open_engine(self.side, index.engine["name"], **engine_options)

    def check_k(self, k: Any) -> int:
        n = self.side.count
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchError(f"k must be >= 1, got {k!r}")
        if k > n:
            raise SearchError(f"k={k} exceeds the gallery size {n} of {self.index.path}; ask for at most {n} results")
        return int(k)

    def search(self, query: BridgeResult, k: int, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        """(rows (Q, k) int64, fused scores (Q, k) float32), best first. ``knobs``: ``ef_search``,
        ``nprobe``, ``refine`` where the engine takes them (None = the index's default)."""
        k = self.check_k(k)
        u, offset = self.query_vectors(query)
        rows, scores = self.engine.search(u, k, **knobs)
        return rows, (scores + offset[:, None]).astype(np.float32)

    @property
    def needs(self) -> frozenset[str]:
        """The query embeddings this side's weights read (:func:`~diffgap.runtime.fusion.query_needs`)."""
        return query_needs(self.weights)

    def query_vectors(self, query: BridgeResult) -> tuple[np.ndarray, np.ndarray]:
        """(U (Q, index width), offset (Q,)) of ``query`` against this side (see :mod:`.fusion`)."""
        fields = {"clap": "source", "head": "projected", "bridged": "projected"}
        read = gallery_spaces(self.weights)  # a block no weighted term reads is multiplied by 0
        for space, width in zip(self.side.spaces, self.side.blocks):
            a = getattr(query, fields[space])
            if space in read and a is not None and a.shape[1] != width:
                raise SearchError(f"query {fields[space]} embeddings are {a.shape[1]}-d, the index's {space} block is {width}-d; "
                                  "use the export the index was built with")
        try:
            return query_vectors(query, self.side.stats, self.weights, self.side.spaces)
        except ValueError as e:
            raise SearchError(f"index {self.index.path}: {e}") from None

    def scores(self, query: BridgeResult) -> np.ndarray:
        """Fused scores against every gallery item (Q, N), read straight off the vectors."""
        u, offset = self.query_vectors(query)
        return (u @ np.asarray(self.side.vectors).T + offset[:, None]).astype(np.float32)

    def close(self) -> None:
        self.engine.close()


class AudioSearch:
    """Text -> audio search over a gallery index (and audio -> caption search when it has captions).

    ``search(texts, k)`` returns ``(ids (Q, k) str, scores (Q, k) float32)``, best first. Per-query
    engine settings (``ef_search``, ``nprobe``, ``refine``) go as keyword arguments to every search.
    """

    def __init__(
        self,
        index: str | os.PathLike | GalleryIndex,
        export_dir: str | os.PathLike | Manifest,
        backend: str = "ort-cpu",
        precision: str = "fp32",
        *,
        seed: int = DEFAULT_SEED,
        weights: Mapping[str, float] | None = None,
        engine_options: Mapping[str, Any] | None = None,
        **session_options: Any,
    ) -> None:
        self.manifest = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
        self.index = index if isinstance(index, GalleryIndex) else GalleryIndex.load(index)
        self.weights = fusion_weights(self.manifest, weights, "text_to_audio")
        self.caption_weights = fusion_weights(self.manifest, weights, "audio_to_text")
        gs = self.index.meta.get("guidance_scale")
        self.t2a = TextToAudioBridge(self.manifest, backend, precision, seed=seed, guidance_scale=gs, **session_options)
        self._a2t: AudioToTextBridge | None = None
        self._engine_options = dict(engine_options or {})
        self._opts = dict(backend=backend, precision=precision, seed=seed, guidance_scale=gs, **session_options)
        self._searchers: dict[str, GallerySearcher] = {}
        try:
            self.index.check_model(self.manifest, self.t2a.head_dim)
            self.searcher("audio")
        except BaseException:
            self.close()
            raise

    def searcher(self, side: str) -> GallerySearcher:
        if side not in self._searchers:
            w = self.weights if side == "audio" else self.caption_weights
            self._searchers[side] = GallerySearcher(self.index, side, w, **self._engine_options)
        return self._searchers[side]

    @property
    def a2t(self) -> AudioToTextBridge:
        if self._a2t is None:
            self._a2t = AudioToTextBridge(self.manifest, **self._opts)
        return self._a2t

    def _embed(self, bridge: TextToAudioBridge | AudioToTextBridge, side: str, x: np.ndarray,
               seed: int | Sequence[int] | None) -> BridgeResult:
        """The query embeddings the side's weights read, and no more (no sampler call where both bridged
        terms weigh 0)."""
        return bridge.embed(x, self.searcher(side).needs, seed=seed)

    # -- text -> audio ----------------------------------------------------------------------
    def score_text_embeddings(self, text: np.ndarray, seed: int | Sequence[int] | None = None) -> np.ndarray:
        """CLAP text embeddings (Q, E) -> fused scores against every gallery audio (Q, N)."""
        return self.searcher("audio").scores(self._embed(self.t2a, "audio", text, seed))

    def search_embeddings(self, text: np.ndarray, k: int = 10, seed: int | Sequence[int] | None = None, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        """CLAP text embeddings (Q, E) -> (ids (Q, k), scores (Q, k)), best first."""
        s = self.searcher("audio")
        s.check_k(k)
        rows, scores = s.search(self._embed(self.t2a, "audio", text, seed), k, **knobs)
        return np.asarray(s.side.ids[rows.ravel()]).reshape(rows.shape), scores

    def search(self, texts: Sequence[str], k: int = 10, seed: int | Sequence[int] | None = None, **knobs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (ids (Q, k), scores (Q, k)) of the best-matching gallery audio."""
        self.searcher("audio").check_k(k)
        return self.search_embeddings(self.t2a.encode(texts), k, seed, **knobs)

    # -- audio -> captions ------------------------------------------------------------------
    def score_audio_embeddings(self, audio: np.ndarray, seed: int | Sequence[int] | None = None) -> np.ndarray:
        return self.searcher("text").scores(self._embed(self.a2t, "text", audio, seed))

    def search_captions_embeddings(self, audio: np.ndarray, k: int = 10, seed: int | Sequence[int] | None = None,
                                   **knobs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CLAP audio embeddings -> (caption ids, captions, scores), each (Q, k)."""
        s = self.searcher("text")
        s.check_k(k)
        rows, scores = s.search(self._embed(self.a2t, "text", audio, seed), k, **knobs)
        flat = rows.ravel()
        return (np.asarray(s.side.ids[flat]).reshape(rows.shape), np.asarray(s.side.captions[flat]).reshape(rows.shape), scores)

    def search_captions(self, audio: Sequence[str | os.PathLike] | np.ndarray, k: int = 10, seed: int | Sequence[int] | None = None,
                        **knobs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Audio files (or prepared waveforms) -> (caption ids, captions, scores), each (Q, k)."""
        self.searcher("text").check_k(k)
        return self.search_captions_embeddings(self.a2t.encode(audio), k, seed, **knobs)

    def close(self) -> None:
        for s in self._searchers.values():
            s.close()
        self._searchers.clear()
        self.t2a.close()
        if self._a2t is not None:
            self._a2t.close()

    def __enter__(self) -> "AudioSearch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
