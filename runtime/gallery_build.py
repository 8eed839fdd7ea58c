"""``build_index``: stream a gallery through the bridges into an index directory, resumably.

The build works in ``INDEX``'s sibling ``.INDEX.partial/`` (a :class:`diffgap.core.jobs.WorkDir`):
per side, chunks of ``chunk_size`` rows are embedded, turned into shifted gallery vectors, written
into a pre-allocated memory-mapped file and folded into the running moments; after each chunk the
work directory's state (rows done, shift, moments, and a fingerprint of every input) is replaced
atomically. Memory stays at one chunk plus the moments. An interrupted build with the same inputs
resumes at its last finished chunk; one with other inputs is discarded and restarted. The engine is
built last, then ``manifest.json`` is written and the directory renamed into place: ``INDEX`` is
either the old index or the complete new one.

Each side keeps only the blocks of the gallery vector that a term of non-zero fusion weight reads
(:func:`diffgap.runtime.fusion.gallery_spaces`), and computes only those: where validation gave both
bridged terms weight 0 a side is the head block alone (D wide, not E + 2D) and no sampler runs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffgap.core.fsutil import atomic_path, atomic_write_text, replace_dir, sha256_file
from diffgap.core.jobs import WorkDir, fingerprint
from diffgap.core.manifest import Manifest

from .fusion import SPACES, TASKS, Moments, fusion_weights, gallery_block, gallery_spaces
from .gallery import INDEX_FORMAT, MANIFEST, SearchError, dump_json, model_identity, side_files
from .search_engines import DEFAULT_ENGINE, Progress, engine_class

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 4096
# The gallery side each retrieval task searches: text queries rank audio, audio queries rank captions.
SIDE_TASK = {"audio": "text_to_audio", "text": "audio_to_text"}
# What a gallery item computes for each block of its vector (the BridgeResult field it reads).
SPACE_INPUT = {"clap": "source", "head": "projected", "bridged": "bridged"}


@dataclass(frozen=True)
class IndexOptions:
    """How to build an index (everything but the gallery itself).

    backend, precision: where the export's models run (:func:`diffgap.runtime.session.open_model`).
    seed, guidance_scale: the gallery-side bridging's sampler noise seed and guidance (default the export's).
    engine, engine_params: the search engine (:mod:`.search_engines`).
    chunk_size: gallery rows embedded per step (and per saved state).
    all_blocks: keep every block of the gallery vector, also those no weighted term reads (what
        indexes held before blocks were left out; for comparisons -- the scores are the same).
    """

    backend: str = "ort-cpu"
    precision: str = "fp32"
    seed: int = 0
    guidance_scale: float | None = None
    engine: str = DEFAULT_ENGINE
    engine_params: Mapping[str, Any] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK
    all_blocks: bool = False


@dataclass
class Gallery:
    """What an index holds: ``audio (N, E_audio)`` embeddings with unique ``ids (N,)``, and optionally
    the caption side for audio -> text queries: ``captions (M,)`` with their ``text (M, E_text)``
    embeddings (without ``text``, encoded with the export's text encoder) and ``caption_ids (M,)``."""

    audio: np.ndarray
    ids: Sequence[str] | np.ndarray
    captions: Sequence[str] | np.ndarray | None = None
    text: np.ndarray | None = None
    caption_ids: Sequence[str] | np.ndarray | None = None

    @property
    def has_captions(self) -> bool:
        return self.captions is not None or self.text is not None


def _check_embeddings(name: str, x: Any, dim: int) -> np.ndarray:
    from .pipeline import check_embeddings

    return check_embeddings(name, x, dim, error=SearchError)


def _checked_audio(g: Gallery, man: Manifest) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(g.ids).astype(str)
    audio = _check_embeddings("audio", g.audio, man.input_dim("audio"))
    if audio.shape[0] == 0:
        raise SearchError("the gallery is empty: give at least one audio embedding")
    if ids.shape != (audio.shape[0],):
        raise SearchError(f"ids must be ({audio.shape[0]},) to match audio, got {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise SearchError("gallery ids must be unique")
    return audio, ids


def _checked_captions(g: Gallery, man: Manifest, t2a: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text (M, E_text), captions (M,), caption ids (M,)); captions without embeddings are encoded."""
    text = g.text
    if text is None:
        if g.captions is None or len(g.captions) == 0:
            raise SearchError("pass captions (and optionally their text embeddings)")
        text = t2a.encode(list(np.asarray(g.captions).astype(str)))
    text = _check_embeddings("text", text, man.input_dim("text"))
    m = text.shape[0]
    cap = np.asarray(g.captions).astype(str) if g.captions is not None else np.array([""] * m)
    cid = np.asarray(g.caption_ids).astype(str) if g.caption_ids is not None else np.array([str(i) for i in range(m)])
    if m == 0 or cap.shape != (m,) or cid.shape != (m,):
        raise SearchError(f"captions and caption_ids must be ({m},) to match text (M >= 1), got {cap.shape} and {cid.shape}")
    return text, cap, cid


@dataclass
class _Side:
    """One side to build: its gallery embeddings, the bridge that embeds them, the blocks it keeps."""

    name: str
    src: np.ndarray
    bridge: Any                      # the AudioToTextBridge (audio side) or TextToAudioBridge (text side)
    spaces: tuple[str, ...]
    blocks: tuple[int, ...]
    arrays: dict[str, np.ndarray]    # files beside the vectors: ids (and captions)

    def embed(self, sl: slice) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        r = self.bridge.embed(self.src[sl], needs={SPACE_INPUT[s] for s in self.spaces})
        return r.source, r.projected, r.bridged


def _vectors(side: _Side, work: WorkDir, chunk: int, progress: Progress | None) -> None:
    """Stream ``side`` into ``<side>_vectors.npy`` and its moments into ``<side>_stats.npz``, resumably."""
    files = side_files(side.name)
    n = len(side.src)
    done = int(work.info.setdefault("done", {}).get(side.name, 0))
    vec = np.lib.format.open_memmap(work.file(files["vectors"]), mode="r+" if done else "w+", dtype=np.float32,
                                    shape=(n, sum(side.blocks)))
    prefix = side.name + "_"
    saved = {k[len(prefix):]: v for k, v in work.arrays.items() if k.startswith(prefix)}
    moments = Moments.from_arrays(side.blocks, saved, side.spaces) if done else Moments(side.blocks, side.spaces)
    shift = saved.get("shift")
    while done < n:
        sl = slice(done, min(n, done + chunk))
        v = gallery_block(*side.embed(sl), spaces=side.spaces).astype(np.float64)
        if shift is None:  # the first chunk's mean: keeps the float32 sums of the moments well conditioned
            shift = v.mean(axis=0)
        vs = (v - shift).astype(np.float32)
        vec[sl] = vs
        moments.update(vs)
        vec.flush()
        done = sl.stop
        work.info["done"][side.name] = done
        work.arrays.update({f"{prefix}shift": shift, **{prefix + k: a for k, a in moments.to_arrays().items()}})
        work.save()
        if progress:
            progress(f"{side.name} vectors", done, n)
    del vec
    work.write_arrays(files["stats"], shift=np.asarray(shift, np.float64), **moments.stats())


def _write_arrays(work: WorkDir, side: _Side) -> None:
    files = side_files(side.name)
    for role, arr in side.arrays.items():
        with atomic_path(work.file(files[role])) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def _side_info(side: _Side) -> dict[str, Any]:
    return {"count": int(len(side.src)), "dim": int(sum(side.blocks)), "blocks": list(side.blocks),
            "spaces": list(side.spaces), "files": side_files(side.name)}


def _build_engine(eng: Any, work: WorkDir, sides: dict[str, dict[str, Any]], params: dict[str, Any], progress: Progress | None) -> None:
    for side, info in sides.items():
        vec = np.load(work.file(info["files"]["vectors"]), mmap_mode="r")
        info["engine_params"] = eng.build(vec, work.path, side, params, progress)
        info["files"].update(eng.files(side))
        del vec
    for info in sides.values():
        info["bytes"] = {r: work.file(f).stat().st_size for r, f in info["files"].items()}
        info["sha256"] = {"stats": sha256_file(work.file(info["files"]["stats"]))}


def build_index(
    export_dir: str | os.PathLike | Manifest,
    out: str | os.PathLike,
    gallery: Gallery | None = None,
    options: IndexOptions | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> Path:
    """Write the gallery index directory ``out`` (replacing an existing index only when complete).

    ``gallery``: a :class:`Gallery`; ``options``: :class:`IndexOptions`. Their fields may also be given
    as keyword arguments (``audio=..., ids=..., engine="faiss-hnsw"``). Gallery-side embeddings are
    computed here, once, with ``options.seed``; ``progress(stage, done, total)`` is called after each chunk.
    """
    gallery, opts = _split_kwargs(gallery, options, kwargs)
    t0 = time.perf_counter()
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
    out = Path(out)
    if opts.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {opts.chunk_size}")
    eng = engine_class(opts.engine)
    params = eng.check_params(dict(opts.engine_params))
    audio, ids = _checked_audio(gallery, man)
    sides, head_dim = _plan_sides(man, gallery, audio, ids, opts)
    try:
        bridge_opts = {"seed": opts.seed, "guidance_scale": opts.guidance_scale}
        settings = {"format": INDEX_FORMAT, "model": model_identity(man, head_dim), "backend": opts.backend,
                    "precision": opts.precision, "engine": opts.engine, "params": params, "chunk": opts.chunk_size,
                    "spaces": {s.name: s.spaces for s in sides}, **bridge_opts}
        fp = fingerprint(settings, [s.src for s in sides] + [a for s in sides for a in s.arrays.values()])
        if opts.engine == "milvus" and not params["collection"]:
            params["collection"] = f"diffgap_{fp[:12]}"
        work = WorkDir(out, "partial", fp)
        status = work.open()
        if status == "resumed":
            log.info("resuming the interrupted build in %s (%s)", work.path, work.info.get("done", {}))
        elif status == "discarded":
            log.info("discarding an interrupted build of other inputs in %s", work.path)
        for side in sides:
            _write_arrays(work, side)
            _vectors(side, work, opts.chunk_size, progress)
    finally:
        for side in sides:
            side.bridge.close()
    infos = {s.name: _side_info(s) for s in sides}
    _build_engine(eng, work, infos, params, progress)
    meta = {
        "format": INDEX_FORMAT,
        "model": model_identity(man, head_dim),
        **bridge_opts,
        "backend": opts.backend,
        "precision": opts.precision,
        "export_dir": str(man.root.resolve()),
        "fusion_weights": {t: fusion_weights(man, None, t) for t in TASKS},
        "engine": {"name": opts.engine, "params": params},
        "sides": infos,
        "count": infos["audio"]["count"],
        "captions": infos.get("text", {}).get("count", 0),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index_seconds": round(time.perf_counter() - t0, 3),
    }
    work.file("state.npz").unlink()
    atomic_write_text(work.file(MANIFEST), dump_json(meta))
    replace_dir(work.path, out)
    log.info("wrote index %s (%d audio, %d captions, engine %s)", out, meta["count"], meta["captions"], opts.engine)
    return out


def _split_kwargs(gallery: Gallery | None, options: IndexOptions | None, kwargs: dict[str, Any]) -> tuple[Gallery, IndexOptions]:
    """``build_index``'s keyword form: the fields of :class:`Gallery` and :class:`IndexOptions`."""
    g_names, o_names = {f.name for f in fields(Gallery)}, {f.name for f in fields(IndexOptions)}
    unknown = sorted(set(kwargs) - g_names - o_names)
    if unknown:
        raise TypeError(f"build_index() got unexpected keyword arguments {unknown}")
    g_kw = {k: v for k, v in kwargs.items() if k in g_names}
    o_kw = {k: v for k, v in kwargs.items() if k in o_names}
    if gallery is None:
        gallery = Gallery(**g_kw)
    elif g_kw:
        raise TypeError(f"build_index(): pass the gallery either as a Gallery or as keywords, not both ({sorted(g_kw)})")
    opts = IndexOptions(**{**(asdict(options) if options is not None else {}), **o_kw})
    return gallery, opts


def _plan_sides(man: Manifest, g: Gallery, audio: np.ndarray, ids: np.ndarray, opts: IndexOptions) -> tuple[list[_Side], int]:
    """The sides to build (audio always, text with captions), each with the blocks its task's weights read."""
    from .pipeline import AudioToTextBridge, TextToAudioBridge

    bridge_kw = {"seed": opts.seed, "guidance_scale": opts.guidance_scale}
    a2t = AudioToTextBridge(man, opts.backend, opts.precision, **bridge_kw)
    t2a = TextToAudioBridge(man, opts.backend, opts.precision, **bridge_kw) if g.has_captions else None
    try:
        head_dim = a2t.head_dim

        def side(name: str, src: np.ndarray, bridge: Any, arrays: dict[str, np.ndarray]) -> _Side:
            spaces = SPACES if opts.all_blocks else gallery_spaces(fusion_weights(man, None, SIDE_TASK[name]))
            width = {"clap": src.shape[1], "head": head_dim, "bridged": head_dim}
            return _Side(name, src, bridge, spaces, tuple(width[s] for s in spaces), arrays)

        sides = [side("audio", audio, a2t, {"ids": ids})]
        if t2a is not None:
            text, cap, cid = _checked_captions(g, man, t2a)
            sides.append(side("text", text, t2a, {"ids": cid, "captions": cap}))
    except BaseException:
        a2t.close()
        if t2a is not None:
            t2a.close()
        raise
    return sides, head_dim
