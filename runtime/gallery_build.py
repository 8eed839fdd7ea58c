"""``build_index``: stream a gallery through the bridges into an index directory, resumably.

The build works in ``INDEX``'s sibling ``.INDEX.partial/``: per side, chunks of ``chunk_size`` rows
are bridged, turned into shifted gallery vectors, written into a pre-allocated memory-mapped file
and folded into the running moments; after each chunk ``build_state.npz`` (rows done, shift,
moments, and a fingerprint of every input) is replaced atomically. Memory stays at one chunk plus
the moments. An interrupted build with the same inputs resumes at its last finished chunk; one with
other inputs is discarded and restarted. The engine is built last, then ``manifest.json`` is written
and the directory renamed into place: ``INDEX`` is either the old index or the complete new one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffgap.core.fsutil import atomic_path, atomic_write_text, replace_dir, sha256_file
from diffgap.core.manifest import Manifest

from .fusion import TASKS, Moments, fusion_weights, gallery_block
from .gallery import INDEX_FORMAT, MANIFEST, SearchError, dump_json, model_identity, side_files
from .search_engines import DEFAULT_ENGINE, Progress, engine_class

log = logging.getLogger(__name__)

STATE = "build_state.npz"
DEFAULT_CHUNK = 4096


def _check_embeddings(name: str, x: Any, dim: int) -> np.ndarray:
    from .pipeline import check_embeddings

    return check_embeddings(name, x, dim, error=SearchError)


def _fingerprint(settings: Mapping[str, Any], arrays: Sequence[np.ndarray | None]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for a in arrays:
        h.update(b"|" if a is None else repr((a.dtype.str, a.shape)).encode())
        if a is not None:
            flat = a.reshape(len(a), -1) if a.ndim else a.reshape(1)
            for s in range(0, len(flat), 1 << 16):
                h.update(np.ascontiguousarray(flat[s:s + (1 << 16)]).tobytes())
    return h.hexdigest()


class _State:
    """The resumable part of a build: settings fingerprint, per side rows done, shift and moments."""

    def __init__(self, work: Path, fingerprint: str) -> None:
        self.path, self.fp = work / STATE, fingerprint
        self.info: dict[str, Any] = {"fingerprint": fingerprint, "done": {}, "phase": "vectors"}
        self.arrays: dict[str, np.ndarray] = {}

    def load(self) -> bool:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            info = json.loads(str(arrays.pop("info")))
        except (OSError, ValueError, KeyError, EOFError):
            return False
        if info.get("fingerprint") != self.fp:
            return False
        self.info, self.arrays = info, arrays
        return True

    def save(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, info=np.array(json.dumps(self.info)), **self.arrays)


def _start(out: Path, fp: str) -> tuple[Path, _State]:
    work = out.parent / f".{out.name}.partial"
    state = _State(work, fp)
    if work.exists():
        if state.load():
            log.info("resuming the interrupted build in %s (%s)", work, state.info["done"])
            return work, state
        log.info("discarding an interrupted build of other inputs in %s", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    state.save()
    return work, state


def _build_side(side: str, work: Path, state: _State, n: int, blocks: tuple[int, int, int],
                bridge: Callable[[slice], tuple[np.ndarray, np.ndarray, np.ndarray]], chunk: int, progress: Progress | None) -> None:
    files = side_files(side)
    dim = sum(blocks)
    vf = work / files["vectors"]
    done = int(state.info["done"].get(side, 0))
    vec = np.lib.format.open_memmap(vf, mode="r+" if done else "w+", dtype=np.float32, shape=(n, dim))
    moments = Moments.from_arrays(blocks, {k[len(side) + 1:]: v for k, v in state.arrays.items() if k.startswith(side + "_")}) \
        if done else Moments(blocks)
    shift = state.arrays.get(f"{side}_shift")
    while done < n:
        sl = slice(done, min(n, done + chunk))
        v = gallery_block(*bridge(sl)).astype(np.float64)
        if shift is None:  # the first chunk's mean: keeps the float32 sums of the moments well conditioned
            shift = v.mean(axis=0)
        vs = (v - shift).astype(np.float32)
        vec[sl] = vs
        moments.update(vs)
        vec.flush()
        done = sl.stop
        state.info["done"][side] = done
        state.arrays.update({f"{side}_shift": shift, **{f"{side}_{k}": a for k, a in moments.to_arrays().items()}})
        state.save()
        if progress:
            progress(f"{side} vectors", done, n)
    del vec
    stats = {"shift": np.asarray(shift, np.float64), **moments.stats()}
    with atomic_path(work / files["stats"]) as tmp, open(tmp, "wb") as f:
        np.savez(f, **stats)



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
    seed: int = 0,
    guidance_scale: float | None = None,
    engine: str = DEFAULT_ENGINE,
    engine_params: Mapping[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> Path:
    """Write the gallery index directory ``out`` (replacing an existing index only when complete).

    ``audio (N, E)``: CLAP audio embeddings of the gallery, ``ids (N,)`` unique. Optionally the caption
    side for audio -> text queries: ``captions (M,)`` with their CLAP text embeddings ``text (M, E)``
    (or without ``text``, encoded here with the export's text encoder) and ``caption_ids (M,)``.
    Gallery-side bridged embeddings are computed here, once, with ``seed``; ``engine`` /
    ``engine_params`` choose the search engine (:mod:`.search_engines`). ``progress(stage, done, total)``
    is called after each chunk.
    """
    from .pipeline import AudioToTextBridge, TextToAudioBridge

    t0 = time.perf_counter()
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir)
    out = Path(out)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    eng = engine_class(engine)
    params = eng.check_params(dict(engine_params or {}))
    ids = np.asarray(ids).astype(str)
    audio = _check_embeddings("audio", audio, man.embed_dim)
    if audio.shape[0] == 0:
        raise SearchError("the gallery is empty: give at least one audio embedding")
    if ids.shape != (audio.shape[0],):
        raise SearchError(f"ids must be ({audio.shape[0]},) to match audio, got {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise SearchError("gallery ids must be unique")
    opts = dict(seed=seed, guidance_scale=guidance_scale)
    a2t = AudioToTextBridge(man, backend, precision, **opts)
    t2a = TextToAudioBridge(man, backend, precision, **opts) if (captions is not None or text is not None) else None
    try:
        head_dim = a2t.head_dim
        blocks = (man.embed_dim, head_dim, head_dim)
        cap = cid = None
        if t2a is not None:
            if text is None:
                if captions is None or len(captions) == 0:
                    raise SearchError("pass captions (and optionally their CLAP text embeddings)")
                text = t2a.encode(list(np.asarray(captions).astype(str)))
            text = _check_embeddings("text", text, man.embed_dim)
            m = text.shape[0]
            cap = np.asarray(captions).astype(str) if captions is not None else np.array([""] * m)
            cid = np.asarray(caption_ids).astype(str) if caption_ids is not None else np.array([str(i) for i in range(m)])
            if m == 0 or cap.shape != (m,) or cid.shape != (m,):
                raise SearchError(f"captions and caption_ids must be ({m},) to match text (M >= 1), got {cap.shape} and {cid.shape}")
        settings = {"format": INDEX_FORMAT, "model": model_identity(man, head_dim), "backend": backend, "precision": precision,
                    "engine": engine, "params": params, "chunk": chunk_size, **opts}
        fp = _fingerprint(settings, [ids, audio, text, cap, cid])
        if engine == "milvus" and not params["collection"]:
            params["collection"] = f"diffgap_{fp[:12]}"
        work, state = _start(out, fp)
        sides: dict[str, dict[str, Any]] = {}

        def run(side: str, src: np.ndarray, bridge: Any, side_ids: np.ndarray, extra: dict[str, np.ndarray]) -> None:
            files = side_files(side)
            for role, arr in {"ids": side_ids, **extra}.items():
                with atomic_path(work / files[role]) as tmp, open(tmp, "wb") as f:
                    np.save(f, arr, allow_pickle=False)

            def bridged(sl: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                r = bridge.bridge_embeddings(src[sl])
                return r.source, r.projected, r.bridged

            _build_side(side, work, state, len(src), blocks, bridged, chunk_size, progress)
            sides[side] = {"count": int(len(src)), "dim": int(sum(blocks)), "blocks": list(blocks), "files": files}

        run("audio", audio, a2t, ids, {})
        if t2a is not None:
            run("text", text, t2a, cid, {"captions": cap})
    finally:
        a2t.close()
        if t2a is not None:
            t2a.close()
    for side, info in sides.items():
        vec = np.load(work / info["files"]["vectors"], mmap_mode="r")
        info["engine_params"] = eng.build(vec, work, side, params, progress)
        info["files"].update(eng.files(side))
        del vec
    for info in sides.values():
        info["bytes"] = {r: (work / f).stat().st_size for r, f in info["files"].items()}
        info["sha256"] = {"stats": sha256_file(work / info["files"]["stats"])}
    meta = {
        "format": INDEX_FORMAT,
        "model": model_identity(man, head_dim),
        **opts,
        "backend": backend,
        "precision": precision,
        "export_dir": str(man.root.resolve()),
        "fusion_weights": {t: fusion_weights(man, None, t) for t in TASKS},
        "engine": {"name": engine, "params": params},
        "sides": sides,
        "count": sides["audio"]["count"],
        "captions": sides.get("text", {}).get("count", 0),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "index_seconds": round(time.perf_counter() - t0, 3),
    }
    (work / STATE).unlink()
    atomic_write_text(work / MANIFEST, dump_json(meta))
    replace_dir(work, out)
    log.info("wrote index %s (%d audio, %d captions, engine %s)", out, meta["count"], meta["captions"], engine)
    return out
