"""``diffgap index EXPORT_DIR --npz PAIRS.npz | --audio-dir DIR --out INDEX [--engine NAME --param K=V]``:
build a gallery index directory (streamed in chunks; an interrupted build resumes when rerun)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffgap.core.audio import AUDIO_SUFFIXES
from diffgap.core.names import BACKENDS, PRECISIONS

HELP = "build a gallery search index (audio embeddings + ids, gallery-side bridged embeddings) from an export"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="directory written by `diffgap export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", metavar="PAIRS.npz", help="paired CLAP embeddings (`diffgap embed`/`synth` format): "
                     "its audio rows are the gallery; its text rows + captions (if any) serve audio -> text queries")
    src.add_argument("--audio-dir", metavar="DIR", help="a folder of audio files, encoded here with the export's audio encoder")
    p.add_argument("--out", required=True, metavar="INDEX", help="output index directory (appears only when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index")
    from .search_engines import DEFAULT_ENGINE, ENGINES

    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=tuple(ENGINES),
                   help="search engine (default exact; see README 'Gallery search at scale')")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter, repeatable: faiss-hnsw m, ef_construction, storage (flat|fp16|sq8); faiss-ivf nlist, "
                        "storage (flat|fp16|sq8|pq), pq_m, train_size; milvus uri, collection, index_type (FLAT|IVF_FLAT|HNSW), "
                        "nlist, m, ef_construction; any engine's per-query defaults ef_search, nprobe, refine")
    p.add_argument("--chunk-size", type=int, default=4096, help="gallery rows bridged per step (default 4096)")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.add_argument("--no-captions", action="store_true", help="index only the audio side of --npz")
    p.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--seed", type=int, default=0, help="sampler noise seed for the gallery-side bridging (default 0)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the export's)")


def parse_params(items: list[str]) -> dict[str, object]:
    from diffgap.core.errors import UserError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--param {item!r}: write it as KEY=VALUE, e.g. --param m=32")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            out[key.strip()] = value
    return out


class StageBars:
    """The ``progress(stage, done, total)`` callback of the index build as one progress bar per stage
    (rows done, rate, time left) on stderr."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from diffgap.core.progress import progress_bar

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = progress_bar(total=total, desc=stage, unit="row")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _audio_files(d: Path) -> list[Path]:
    from diffgap.core.errors import UserError

    if not d.is_dir():
        raise NotADirectoryError(f"--audio-dir {d} is not a directory")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise UserError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {d}")
    return files


def run(args: argparse.Namespace) -> int:
    progress = None if args.quiet else StageBars()
    try:
        return _run(args, progress)
    finally:
        if progress is not None:
            progress.close()


def _run(args: argparse.Namespace, progress: StageBars | None) -> int:
    import numpy as np

    from diffgap.core.errors import UserError
    from diffgap.core.manifest import Manifest

    from .gallery import GalleryIndex
    from .gallery_build import build_index
    from .pipeline import AudioToTextBridge

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    man = Manifest.load(args.export_dir, verify=True)
    common = dict(backend=args.backend, precision=args.precision, seed=args.seed, guidance_scale=args.guidance_scale,
                  engine=args.engine, engine_params=parse_params(args.param), chunk_size=args.chunk_size,
                  progress=progress)
    if args.npz:
        from diffgap.core.data import load_pairs

        pairs = load_pairs(args.npz, embed_dim={m: man.input_dim(m) for m in ("audio", "text")}, require=("audio",))
        text = None if args.no_captions else pairs.embeddings.get("text")
        captions = None if text is None else pairs.captions
        if text is not None and captions is None:
            captions = pairs.ids  # no caption strings stored: show the pair ids instead
        build_index(man, out, audio=pairs.embeddings["audio"], ids=pairs.ids, text=text, captions=captions,
                    caption_ids=None if text is None else pairs.ids, **common)
    else:
        from diffgap.core.audio import AudioError, load_clips

        root = Path(args.audio_dir)
        files = _audio_files(root)
        embs, ids, skipped = [], [], []
        with AudioToTextBridge(man, args.backend, args.precision, seed=args.seed) as a2t:
            chunk = a2t.encoder.io.max_batch  # decode one encoder batch at a time: 1.9 MB per 10 s clip
            for i in range(0, len(files), chunk):
                waves = []
                for f in files[i:i + chunk]:
                    try:
                        waves.append(load_clips(f, long_clip="center"))
                        ids.append(str(f.relative_to(root)))
                    except AudioError as e:  # listed below with the reason, never a crash
                        skipped.append(str(e))
                if waves:
                    embs.append(a2t.encode(np.concatenate(waves)))
                if progress is not None:
                    progress("encode audio", min(i + chunk, len(files)), len(files))
        for s in skipped:
            print(f"skipped {s}")
        if not ids:
            raise UserError(f"none of the audio files under {root} could be decoded (reasons above)")
        build_index(man, out, audio=np.concatenate(embs), ids=ids, **common)
    print(f"wrote {GalleryIndex.load(out).describe()}")
    return 0
