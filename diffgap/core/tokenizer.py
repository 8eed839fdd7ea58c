"""Torch-free text tokenizers for CLAP text towers (the runtime uses these; no torch import).

* :class:`ClipBPETokenizer` -- laion-clap's bundled CLIP byte-level BPE (``clap_module/tokenizer.py``
  ``tokenize``) for the ``transformer`` text tower, reimplemented on numpy. It reads laion-clap's
  vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` (a merges list) and can copy it into an export
  directory (:meth:`save`) and load it back from there (:meth:`from_file`), so a runtime box needs
  no laion-clap. Output equals ``laion_clap.clap_module.tokenize`` exactly (tested).
* :class:`RobertaTokenizer` -- the RoBERTa text tower of real LAION-CLAP checkpoints, via the
  Hugging Face ``tokenizers`` library (Rust, torch-free) reading ``tokenizer.json`` or
  ``vocab.json`` + ``merges.txt`` from a local directory; laion-clap's settings (pad to 77, truncate).

Text cleaning follows laion-clap: ``ftfy.fix_text``, HTML-unescape twice, collapse whitespace,
lower-case. ``ftfy`` and ``regex`` (``\\p{L}`` classes) are pure-python, torch-free dependencies.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

CONTEXT_LENGTH = 77
CLIP_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
# laion-clap keeps merges[1 : 49152 - 256 - 2 + 1]: line 0 is a header; 48894 merges + 512 byte
# symbols + 2 specials = a 49408-token vocabulary (text_cfg.vocab_size).
_CLIP_N_MERGES = 49152 - 256 - 2
MIN_VOCAB = 1000  # anything smaller is a broken/offline placeholder tokenizer (roberta: 50265)


def _deps():
    try:
        import ftfy
        import regex
    except ImportError as e:
        raise ImportError(f"the CLAP tokenizer needs `ftfy` and `regex` ({e}); pip install ftfy regex") from e
    return ftfy, regex


@lru_cache()
def byte_symbols() -> dict[int, str]:
    """Byte -> printable unicode symbol, the reversible table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """laion-clap's ``whitespace_clean(basic_clean(text)).lower()``."""
    ftfy, regex = _deps()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def bundled_clip_vocab() -> Path:
    """Path of laion-clap's bundled vocabulary file, found without importing laion-clap."""
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"laion-clap is not installed, so its {CLIP_VOCAB_FILENAME} cannot be found; "
            "load the tokenizer from an export dir with ClipBPETokenizer.from_file(DIR)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "clap_module" / CLIP_VOCAB_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the laion-clap install; reinstall laion-clap==1.1.7")
    return path


class ClipBPETokenizer:
    """laion-clap's CLIP BPE ``tokenize``: texts -> ``(B, 77)`` int64 ids, 0-padded.

    Each row is ``[<start_of_text>] + bpe(text) + [<end_of_text>]`` truncated to 77 (laion-clap
    truncates *after* adding the end token, so an overlong caption has no end token; the transformer
    tower then pools at the highest id, as laion-clap does).
    """

    kind = "clip-bpe"

    def __init__(self, merges: Sequence[tuple[str, str]], context_length: int = CONTEXT_LENGTH,
                 source: Path | None = None) -> None:
        _, regex = _deps()
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(CLIP_SPECIALS)
        if len(vocab) < MIN_VOCAB:
            raise ValueError(
                f"BPE vocabulary has only {len(vocab)} tokens (< {MIN_VOCAB}); the vocab file is truncated "
                f"or wrong -- use laion-clap's {CLIP_VOCAB_FILENAME}"
            )
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.context_length = int(context_length)
        self.vocab_size = len(vocab)
        self.sot = self.encoder[CLIP_SPECIALS[0]]
        self.eot = self.encoder[CLIP_SPECIALS[1]]
        self.source = source
        self._cache: dict[str, list[str]] = {s: [s] for s in CLIP_SPECIALS}
        specials = "|".join(CLIP_SPECIALS)
        # The pre-tokenisation pattern of laion-clap/CLIP (specials first; letters runs; single
        # digits; runs of other non-space symbols; English clitics).
        self._pat = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    # -- construction / persistence --------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH) -> "ClipBPETokenizer":
        """Load from a vocab file (``.txt.gz`` or plain ``.txt``) or a directory holding one.

        ``None`` loads laion-clap's bundled file.
        """
        path = bundled_clip_vocab() if path is None else Path(path)
        if path.is_dir():
            path = path / CLIP_VOCAB_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"BPE vocab file {path} not found; copy laion-clap's {CLIP_VOCAB_FILENAME} there")
        raw = path.read_bytes()
        try:
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable BPE vocab file ({e}); re-copy {CLIP_VOCAB_FILENAME}") from e
        lines = text.rstrip("\n").split("\n")[1:_CLIP_N_MERGES + 1]
        merges = []
        for n, line in enumerate(lines, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {n} is not a 'left right' merge ({line!r}); the file is corrupt")
            merges.append((parts[0], parts[1]))
        return cls(merges, context_length, source=path)

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy the vocab file into ``directory`` (e.g. an export dir); returns the new path."""
        from diffgap.core.fsutil import atomic_path

        if self.source is None:
            raise ValueError("this tokenizer was built from in-memory merges; build it with from_file to save it")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / CLIP_VOCAB_FILENAME
        if dest.resolve() != self.source.resolve():
            with atomic_path(dest) as tmp:
                if self.source.read_bytes()[:2] == b"\x1f\x8b":
                    shutil.copyfile(self.source, tmp)
                else:
                    tmp.write_bytes(gzip.compress(self.source.read_bytes(), mtime=0))
        return dest

    # -- tokenisation ------------------------------------------------------------------------
    def _bpe(self, token: str) -> list[str]:
        """Byte-level word -> BPE symbols (lowest-rank pair merged first, all its occurrences)."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = self.ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """One text -> BPE ids without start/end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"captions must be str, got {type(text).__name__}")
        table = byte_symbols()
        ids: list[int] = []
        for piece in self._pat.findall(clean_text(text)):
            word = "".join(table[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(word))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """texts -> ``input_ids (B, 77)`` int64 (laion-clap ``tokenize``)."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            row = [self.sot, *self.encode(text), self.eot][: self.context_length]
            out[i, : len(row)] = row
        return out

    def feeds(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """texts -> the text encoder's feed dict (``input_ids``)."""
        return {"input_ids": self(texts)}


class RobertaTokenizer:
    """RoBERTa byte-level BPE (roberta-base) via the Hugging Face ``tokenizers`` library, torch-free.

    Mirrors laion-clap's ``RobertaTokenizer(padding="max_length", truncation=True, max_length=77)``:
    ``<s> ... </s>`` then ``<pad>`` (id 1) up to 77, ``attention_mask`` 1 on real tokens. Reads
    ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, from ``directory``.
    """

    kind = "roberta"
    FILES = ("tokenizer.json", "vocab.json", "merges.txt")

    def __init__(self, directory: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> None:
        try:
            from tokenizers import Tokenizer, pre_tokenizers, decoders, processors
            from tokenizers.models import BPE
        except ImportError as e:
            raise ImportError(f"RoBERTa tokenisation needs the `tokenizers` package ({e}); pip install tokenizers") from e
        d = Path(directory)
        self.directory = d
        if (d / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            tok = Tokenizer(BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise FileNotFoundError(
                f"no RoBERTa tokenizer in {d}: put roberta-base's tokenizer.json (or vocab.json + merges.txt) there"
            )
        vocab = tok.get_vocab()
        if len(vocab) < MIN_VOCAB:
            raise ValueError(
                f"RoBERTa tokenizer in {d} has only {len(vocab)} tokens (< {MIN_VOCAB}); it is a placeholder, "
                "not roberta-base's 50265-token vocabulary -- copy the real tokenizer files"
            )
        for special in ("<s>", "</s>", "<pad>"):
            if special not in vocab:
                raise ValueError(f"RoBERTa tokenizer in {d} lacks the special token {special!r}; wrong files")
        self.bos, self.eos, self.pad = vocab["<s>"], vocab["</s>"], vocab["<pad>"]
        # laion-clap's template: <s> A </s>; truncation keeps the end token.
        tok.post_processor = processors.RobertaProcessing(("</s>", self.eos), ("<s>", self.bos), trim_offsets=True,
                                                          add_prefix_space=False)
        tok.enable_truncation(max_length=context_length)
        tok.enable_padding(length=context_length, pad_id=self.pad, pad_token="<pad>")
        self._tok = tok
        self.context_length = context_length
        self.vocab_size = len(vocab)

    def feeds(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), self.context_length)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(texts), self.context_length)
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        return self.feeds(texts)["input_ids"]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (the full pipeline) into ``directory``; returns its path."""
        from diffgap.core.fsutil import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / "tokenizer.json"
        atomic_write_text(dest, self._tok.to_str())
        return dest

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> "RobertaTokenizer":
        p = Path(path)
        return cls(p.parent if p.is_file() else p, context_length)


def load_tokenizer(kind: str, directory: str | os.PathLike | None = None):
    """The tokenizer an IOSpec's ``meta["tokenizer"]`` names, loaded from ``directory``."""
    if kind == ClipBPETokenizer.kind:
        return ClipBPETokenizer.from_file(directory)
    if kind == RobertaTokenizer.kind:
        if directory is None:
            raise ValueError("a RoBERTa tokenizer needs a directory holding tokenizer.json")
        return RobertaTokenizer(directory)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'clip-bpe' or 'roberta'")
