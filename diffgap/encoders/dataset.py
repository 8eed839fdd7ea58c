"""Audio folders + caption tables -> paired CLAP embeddings (``diffgap.core.data`` ``.npz``), resumably.

Inputs (any of):

* a captions CSV in AudioCaps layout (``audiocap_id,youtube_id,start_time,caption``; one pair per
  row, id = ``audiocap_id``) or Clotho layout (``file_name,caption_1..caption_5``; five pairs per
  file, ids ``<file_name>#1`` .. ``#5``). AudioCaps rows are matched to audio files by stem, trying
  ``<audiocap_id>``, ``<youtube_id>_<start_time>``, ``Y<youtube_id>_<start_time>``, ``<youtube_id>``,
  ``Y<youtube_id>`` in that order; Clotho rows by ``file_name``. The audio folder defaults to the
  CSV's folder.
* an audio folder alone: captions come from sidecar text files (``dog.wav`` + ``dog.txt``, one
  caption per non-empty line; ids ``<relative path>#<line>``).

Every unique audio file and caption is embedded once. Work is cut into fixed chunks written as
shard files (atomically) under ``.<out>.embed-parts/`` next to the output, with a fingerprint of the
inputs and encoder (a :class:`diffgap.core.jobs.WorkDir`); a rerun after an interruption skips
finished shards. Only when every shard is
done is the ``.npz`` written (atomically, by ``diffgap.core.data.save_pairs``) and the shard folder
removed -- so there is never a half-written ``.npz``. Files that fail to decode, rows without audio
and empty captions are skipped and reported with the reason (also in ``<out>.skipped.tsv``).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from diffgap.core.audio import AUDIO_SUFFIXES
from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_write_text, sha256_file
from diffgap.core.jobs import WorkDir, fingerprint

log = logging.getLogger(__name__)

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
CLOTHO_COLUMNS = ("file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5")


@dataclass
class Pair:
    id: str
    audio: str        # audio file path relative to the audio folder
    caption: str


@dataclass
class Plan:
    """What to embed: the pairs, the unique audio files and captions, and what was skipped."""

    pairs: list[Pair]
    audio_root: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)

    @property
    def audio_files(self) -> list[str]:
        return sorted({p.audio for p in self.pairs})

    @property
    def captions(self) -> list[str]:
        return list(dict.fromkeys(p.caption for p in self.pairs))


def _audio_index(root: Path) -> dict[str, str]:
    """stem -> relative path of every audio file under ``root`` (first in sorted order wins)."""
    index: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES:
            index.setdefault(p.stem, str(p.relative_to(root)))
    return index


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); save the captions CSV as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV ({e})") from None
    rows = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in rows]
    return header, rows


def _start_time_forms(s: str) -> list[str]:
    s = s.strip()
    forms = [s]
    try:
        f = float(s)
        forms += [str(int(f)) if f.is_integer() else str(f), f"{f:.1f}", f"{f:.3f}", str(int(round(f * 1000)))]
    except ValueError:
        pass
    return list(dict.fromkeys(forms))


def plan_from_csv(csv_path: str | os.PathLike, audio_dir: str | os.PathLike | None = None) -> Plan:
    """Read an AudioCaps or Clotho captions CSV and match its rows to audio files."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"captions CSV {csv_path} not found")
    root = Path(audio_dir) if audio_dir is not None else csv_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} not found; pass --audio-dir")
    header, rows = _read_csv(csv_path)
    index = _audio_index(root)
    plan = Plan([], root)
    seen: set[str] = set()

    def add(pid: str, audio: str | None, caption: str, looked_for: str) -> None:
        caption = caption.strip()
        if pid in seen:
            plan.skipped.append((pid, "duplicate id in the CSV"))
        elif audio is None:
            plan.skipped.append((pid, f"no audio file under {root} (looked for {looked_for})"))
        elif not caption:
            plan.skipped.append((pid, "empty caption"))
        else:
            seen.add(pid)
            plan.pairs.append(Pair(pid, audio, caption))

    if all(c in header for c in AUDIOCAPS_COLUMNS):
        for r in rows:
            yid, st = r["youtube_id"].strip(), r["start_time"]
            stems = [r["audiocap_id"].strip()]
            stems += [f"{p}{yid}_{t}" for p in ("", "Y") for t in _start_time_forms(st)]
            stems += [yid, f"Y{yid}"]
            audio = next((index[s] for s in stems if s in index), None)
            add(r["audiocap_id"].strip(), audio, r["caption"], "stems " + ", ".join(stems[:3]) + ", ...")
    elif all(c in header for c in CLOTHO_COLUMNS[:2]):
        cols = [c for c in CLOTHO_COLUMNS[1:] if c in header]
        for r in rows:
            name = r["file_name"].strip()
            rel = name if (root / name).is_file() else index.get(Path(name).stem)
            for j, c in enumerate(cols, start=1):
                add(f"{name}#{j}", rel, r[c], repr(name))
    else:
        raise UserError(
            f"{csv_path}: unknown caption columns {header}; expected AudioCaps ({','.join(AUDIOCAPS_COLUMNS)}) "
            f"or Clotho ({','.join(CLOTHO_COLUMNS)})"
        )
    return plan


def plan_from_folder(audio_dir: str | os.PathLike) -> Plan:
    """An audio folder whose captions sit in sidecar ``.txt`` files (one caption per line)."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} not found")
    plan = Plan([], root)
    files = sorted(_audio_index(root).values())
    if not files:
        raise UserError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {root}")
    for rel in files:
        txt = (root / rel).with_suffix(".txt")
        if not txt.is_file():
            plan.skipped.append((rel, f"no caption file {txt.name} next to it (or pass --captions CSV)"))
            continue
        caps = [c.strip() for c in txt.read_text(encoding="utf-8", errors="replace").splitlines() if c.strip()]
        if not caps:
            plan.skipped.append((rel, f"{txt.name} holds no caption"))
        for j, c in enumerate(caps, start=1):
            plan.pairs.append(Pair(f"{rel}#{j}", rel, c))
    return plan


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def encoder_identity(encoder) -> dict:
    """What makes embeddings reproducible: the arch, and the checkpoint's content hash if any."""
    ident = {"arch": encoder.info()["arch"], "source": encoder.source}
    src = Path(encoder.source)
    if src.is_file():
        ident["sha256"] = sha256_file(src)
    return ident


def _check_output(out: Path, batch_size: int, overwrite: bool) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if out.suffix != ".npz":
        raise UserError(f"output {out} must end in .npz")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"output folder {out.parent} is not writable; choose another --out")


@dataclass
class _Shards:
    """The plan cut into shards: ``audio_<k>.npz`` (``batch_size`` files) and ``text_<k>.npz`` (captions)."""

    audio: list[Sequence[str]]
    text: list[Sequence[str]]

    @classmethod
    def of(cls, plan: Plan, batch_size: int) -> "_Shards":
        return cls(_chunks(plan.audio_files, batch_size), _chunks(plan.captions, max(batch_size, 64)))

    @property
    def names(self) -> list[str]:
        return [f"audio_{k:06d}.npz" for k in range(len(self.audio))] + [f"text_{k:06d}.npz" for k in range(len(self.text))]

    def chunk(self, name: str) -> tuple[str, Sequence[str]]:
        kind, k = name[: -len(".npz")].split("_")
        return kind, (self.audio if kind == "audio" else self.text)[int(k)]


def _embed_audio(plan: Plan, encoder, files: Sequence[str], batch_size: int, long_clip: str) -> Mapping[str, np.ndarray]:
    """One audio shard: the decoded files' embeddings (keys, emb) and the failures (failed, reasons)."""
    from diffgap.core import audio as daudio

    ok, clips, failed, reasons = [], [], [], []
    for rel in files:
        try:
            clips.append(daudio.load_clips(plan.audio_root / rel, long_clip))
            ok.append(rel)
        except daudio.AudioError as e:
            failed.append(rel)
            reasons.append(f"{e.kind}: {daudio.AUDIO_ERRORS[e.kind]}")
    width = int(encoder.info()["embed_dim"])
    emb = encoder.encode_clip_groups(clips, batch_size) if clips else np.zeros((0, width), np.float32)
    return {"keys": np.array(ok, dtype=str), "emb": emb, "failed": np.array(failed, dtype=str), "reasons": np.array(reasons, dtype=str)}


def _assemble(work: WorkDir, shards: _Shards) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """(audio file -> embedding, caption -> embedding, failed audio file -> reason) from the shards."""
    audio, text, failed = {}, {}, {}
    for name in shards.names:
        with np.load(work.file(name)) as z:
            (audio if name.startswith("audio") else text).update(zip(z["keys"].tolist(), z["emb"]))
            if "failed" in z.files:
                failed.update(zip(z["failed"].tolist(), z["reasons"].tolist()))
    return audio, text, failed


def _write_pairs(out: Path, plan: Plan, audio: dict[str, np.ndarray], text: dict[str, np.ndarray],
                 skipped: list[tuple[str, str]], encoder_id: dict | None = None) -> None:
    """The rows whose audio decoded, as one ``.npz``; the skipped items beside it (``<out>.skipped.tsv``)."""
    from diffgap.core.data import save_pairs

    rows = [p for p in plan.pairs if p.audio in audio]
    if not rows:
        raise UserError(f"none of the {len(plan.audio_files)} audio files could be decoded; see the reasons above "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "no rows to write")
    save_pairs(out, ids=[p.id for p in rows], audio=np.stack([audio[p.audio] for p in rows]),
               text=np.stack([text[p.caption] for p in rows]), captions=[p.caption for p in rows],
               encoder=encoder_id)
    report = out.with_name(out.stem + ".skipped.tsv")
    if skipped:
        atomic_write_text(report, "".join(f"{i}\t{r}\n" for i, r in skipped))
    elif report.exists():
        report.unlink()


def embed_plan(
    plan: Plan,
    encoder,
    out: str | os.PathLike,
    batch_size: int = 16,
    long_clip: str = "center",
    progress: bool = True,
    overwrite: bool = False,
    on_shard: Callable[[str], None] | None = None,
) -> tuple[Path, list[tuple[str, str]]]:
    """Embed ``plan`` with ``encoder`` (a :class:`~diffgap.encoders.clap.ClapEncoder`) into ``out``.

    Resumable (see the module docstring). Returns ``(out, skipped)``; ``skipped`` lists
    ``(item, reason)`` for everything left out. ``on_shard`` is called after each shard is written.
    """
    out = Path(out)
    _check_output(out, batch_size, overwrite)
    if not plan.pairs:
        reasons = "; ".join(f"{i}: {r}" for i, r in plan.skipped[:3])
        raise UserError(f"nothing to embed: no (audio, caption) pairs found ({reasons or 'empty input'})")
    settings = {"encoder": encoder_identity(encoder), "batch": batch_size, "long_clip": long_clip,
                "root": str(plan.audio_root.resolve())}
    work = WorkDir(out, "embed-parts", fingerprint(settings, lines=(f"{p.id}\0{p.audio}\0{p.caption}" for p in plan.pairs)))
    if work.open() == "discarded":
        log.info("discarding stale shards in %s (inputs or encoder changed)", work.path)
    shards = _Shards.of(plan, batch_size)

    def make(name: str) -> Mapping[str, np.ndarray]:
        kind, chunk = shards.chunk(name)
        if kind == "audio":
            return _embed_audio(plan, encoder, chunk, batch_size, long_clip)
        return {"keys": np.array(list(chunk), dtype=str), "emb": encoder.encode_text(list(chunk), batch_size=max(batch_size, 64))}

    bar = None
    if progress:
        from diffgap.core.progress import progress_bar

        bar = progress_bar(total=len(shards.names), initial=work.done(shards.names), unit="shard", desc=f"embed -> {out.name}")

    def done(name: str) -> None:
        if bar is not None:
            bar.update(1)
        if on_shard is not None:
            on_shard(name)

    try:
        work.run_shards(shards.names, make, on_shard=done)
    finally:
        if bar is not None:
            bar.close()
    audio, text, failed = _assemble(work, shards)
    skipped = list(plan.skipped) + sorted(failed.items())
    _write_pairs(out, plan, audio, text, skipped,
                 encoder.identity() if hasattr(encoder, "identity") else None)  # e.g. the transformers CLAP fingerprint
    work.remove()
    return out, skipped
