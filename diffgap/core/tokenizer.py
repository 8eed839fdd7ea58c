"""Torch-free text tokenizers for CLAP text towers (the runtime uses these; no torch import).

Both run on the Hugging Face ``tokenizers`` library (Rust, torch-free):

* :class:`ClipBPETokenizer` -- laion-clap's bundled CLIP byte-level BPE (``clap_module/tokenizer.py``
  ``tokenize``) for the ``transformer`` text tower: a ``tokenizers`` BPE model (``</w>`` end-of-word
  suffix) over laion-clap's vocabulary file ``bpe_simple_vocab_16e6.txt.gz``, behind a ``Split``
  pre-tokenizer with CLIP's pattern and a ``ByteLevel`` byte-to-symbol mapping. It can copy the vocab
  file into an export directory (:meth:`save`) and load it back from there (:meth:`from_file`), so a
  runtime box needs no laion-clap. Ids equal ``laion_clap.clap_module.tokenize`` (tested over
  hundreds of captions: unicode, mojibake, HTML entities, overlong, empty).
* :class:`RobertaTokenizer` -- the RoBERTa text tower of real LAION-CLAP checkpoints, reading
  ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` from a local directory; laion-clap's settings
  (pad to :data:`CONTEXT_LENGTH`, truncate).

Text cleaning follows laion-clap: ``ftfy.fix_text``, HTML-unescape twice, collapse whitespace,
lower-case. ``ftfy`` and ``regex`` are pure-python, torch-free dependencies.

A tokenizer returns its output by *role* (:data:`~diffgap.core.iospec.ROLE_TOKEN_IDS`,
:data:`~diffgap.core.iospec.ROLE_ATTENTION_MASK`); :meth:`feeds` keys it by the tensor names the
text encoder's :class:`~diffgap.core.iospec.IOSpec` declares for those roles.
"""
from __future__ import annotations

import abc

import gzip
import html
import importlib.util
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffgap.core.errors import UserError
from diffgap.core.iospec import ROLE_ATTENTION_MASK, ROLE_TOKEN_IDS, IOSpec

# laion-clap's text context, CLIP BPE and RoBERTa alike (clap_module/tokenizer.py ``tokenize``,
# clap_module/model.py ``RobertaTokenizer(max_length=77)``); the text encoder's IOSpec shape reads it.
CONTEXT_LENGTH = 77
CLIP_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
# laion-clap keeps merges[1 : 49152 - 256 - 2 + 1]: line 0 is a header; 48894 merges + 512 byte
# symbols + 2 specials = a 49408-token vocabulary (text_cfg.vocab_size).
_CLIP_N_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenisation pattern (laion-clap ``SimpleTokenizer.pat`` without its IGNORECASE: the
# text is lower-cased first): English clitics, letter runs, single digits, runs of other non-space
# symbols. Whitespace between matches is dropped.
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MIN_VOCAB = 1000  # anything smaller is a broken/offline placeholder tokenizer (roberta: 50265)


def _deps():
    try:
        import ftfy
        import regex
    except ImportError as e:
        raise ImportError(f"the CLAP tokenizer needs `ftfy` and `regex` ({e}); pip install ftfy regex") from e
    return ftfy, regex


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"CLAP tokenisation needs the `tokenizers` package ({e}); pip install tokenizers") from e
    return tokenizers


@lru_cache()
def byte_symbols() -> dict[int, str]:
    """Byte -> printable unicode symbol, the reversible table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in order.
    The insertion order (printable bytes first) is laion-clap's vocabulary order.
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


def _as_list(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"captions must be str, got {type(t).__name__}")
    return texts


class _Tokenizer(abc.ABC):
    """Shared interface: texts -> ``{role: (B, context_length) int64}`` and -> an encoder's feeds."""

    kind = ""
    context_length = CONTEXT_LENGTH

    @abc.abstractmethod
    def encode_roles(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Token arrays keyed by tensor role (``token_ids``, ``attention_mask``), each ``(B, context_length)``."""

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """texts -> token ids ``(B, context_length)`` int64."""
        return self.encode_roles(texts)[ROLE_TOKEN_IDS]

    def feeds(self, texts: str | Sequence[str], io: IOSpec) -> dict[str, np.ndarray]:
        """texts -> the text encoder's feed dict, keyed by the tensors ``io`` declares for the token-ids
        role and (where declared) the attention-mask role, in their declared dtypes."""
        out = self.encode_roles(texts)
        feeds = {}
        for role in (ROLE_TOKEN_IDS, ROLE_ATTENTION_MASK):
            if role == ROLE_ATTENTION_MASK and not io.has_role(role):
                continue
            t = io.role(role)
            if t.feature_shape != (self.context_length,):
                raise UserError(f"{io.name} takes {t.name} of shape {t.feature_shape} but the {self.kind} tokenizer "
                                f"writes {self.context_length} tokens; re-export the encoder and its tokenizer together")
            feeds[t.name] = out[role].astype(t.np_dtype, copy=False)
        return feeds


class ClipBPETokenizer(_Tokenizer):
    """laion-clap's CLIP BPE ``tokenize``: texts -> ``(B, 77)`` int64 ids, 0-padded.

    Each row is ``[<start_of_text>] + bpe(text) + [<end_of_text>]`` truncated to 77 (laion-clap
    truncates *after* adding the end token, so an overlong caption has no end token; the transformer
    tower then pools at the highest id, as laion-clap does). The attention mask (for encoders that
    declare one) is 1 on the row's non-padding tokens.

    The two special tokens are matched anywhere in the cleaned text as ``tokenizers`` added tokens;
    laion-clap's pattern matches them only where no run of other symbols starts earlier (``"<<start_of_text>"``
    tokenises differently), a case no caption meets.
    """

    kind = "clip-bpe"

    def __init__(self, merges: Sequence[tuple[str, str]], context_length: int = CONTEXT_LENGTH,
                 source: Path | None = None) -> None:
        tk = _tokenizers()
        from tokenizers import Regex, pre_tokenizers
        from tokenizers.models import BPE

        symbols = list(byte_symbols().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(CLIP_SPECIALS)
        if len(tokens) < MIN_VOCAB:
            raise UserError(
                f"BPE vocabulary has only {len(tokens)} tokens (< {MIN_VOCAB}); the vocab file is truncated "
                f"or wrong -- use laion-clap's {CLIP_VOCAB_FILENAME}"
            )
        vocab = {tok: i for i, tok in enumerate(tokens)}
        # BPE merges the lowest-ranked pair first until none applies, as laion-clap's ``bpe``; the
        # suffix marks a word's last symbol (laion-clap appends "</w>" to it).
        tok = tk.Tokenizer(BPE(vocab, [tuple(m) for m in merges], end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.add_special_tokens(list(CLIP_SPECIALS))
        self._tok = tok
        self.context_length = int(context_length)
        self.vocab_size = len(vocab)
        self.sot = vocab[CLIP_SPECIALS[0]]
        self.eot = vocab[CLIP_SPECIALS[1]]
        self.source = source

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
            raise UserError(f"{path} is not a readable BPE vocab file ({e}); re-copy {CLIP_VOCAB_FILENAME}") from e
        lines = text.rstrip("\n").split("\n")[1:_CLIP_N_MERGES + 1]
        merges = []
        for n, line in enumerate(lines, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{path}: line {n} is not a 'left right' merge ({line!r}); the file is corrupt")
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
    def encode(self, text: str) -> list[int]:
        """One text -> BPE ids without start/end tokens."""
        return self._tok.encode(clean_text(_as_list(text)[0]), add_special_tokens=False).ids

    def encode_roles(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """texts -> ``{token_ids, attention_mask}``, each ``(B, 77)`` int64 (laion-clap ``tokenize``)."""
        texts = _as_list(texts)
        enc = self._tok.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        ids = np.zeros((len(texts), self.context_length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(enc):
            row = [self.sot, *e.ids, self.eot][: self.context_length]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {ROLE_TOKEN_IDS: ids, ROLE_ATTENTION_MASK: mask}



def _padded_roles(tok: Any, texts: list[str], context_length: int) -> dict[str, np.ndarray]:
    """Token ids and attention mask (B, context_length) int64 from a ``tokenizers.Tokenizer`` that pads
    and truncates to ``context_length`` itself."""
    enc = tok.encode_batch(texts)
    shape = (len(texts), context_length)
    return {
        ROLE_TOKEN_IDS: np.array([e.ids for e in enc], dtype=np.int64).reshape(shape),
        ROLE_ATTENTION_MASK: np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(shape),
    }

class RobertaTokenizer(_Tokenizer):
    """RoBERTa byte-level BPE (roberta-base) via the Hugging Face ``tokenizers`` library, torch-free.

    Mirrors laion-clap's ``RobertaTokenizer(padding="max_length", truncation=True, max_length=77)``:
    ``<s> ... </s>`` then ``<pad>`` (id 1) up to 77, ``attention_mask`` 1 on real tokens. Reads
    ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, from ``directory``.
    """

    kind = "roberta"
    FILES = ("tokenizer.json", "vocab.json", "merges.txt")

    def __init__(self, directory: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> None:
        tk = _tokenizers()
        from tokenizers import decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        d = Path(directory)
        self.directory = d
        if (d / "tokenizer.json").is_file():
            tok = tk.Tokenizer.from_file(str(d / "tokenizer.json"))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            tok = tk.Tokenizer(BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise FileNotFoundError(
                f"no RoBERTa tokenizer in {d}: put roberta-base's tokenizer.json (or vocab.json + merges.txt) there"
            )
        vocab = tok.get_vocab()
        if len(vocab) < MIN_VOCAB:
            raise UserError(
                f"RoBERTa tokenizer in {d} has only {len(vocab)} tokens (< {MIN_VOCAB}); it is a placeholder, "
                "not roberta-base's 50265-token vocabulary -- copy the real tokenizer files"
            )
        for special in ("<s>", "</s>", "<pad>"):
            if special not in vocab:
                raise UserError(f"RoBERTa tokenizer in {d} lacks the special token {special!r}; wrong files")
        self.bos, self.eos, self.pad = vocab["<s>"], vocab["</s>"], vocab["<pad>"]
        # laion-clap's template: <s> A </s>; truncation keeps the end token.
        tok.post_processor = processors.RobertaProcessing(("</s>", self.eos), ("<s>", self.bos), trim_offsets=True,
                                                          add_prefix_space=False)
        tok.enable_truncation(max_length=context_length)
        tok.enable_padding(length=context_length, pad_id=self.pad, pad_token="<pad>")
        self._tok = tok
        self.context_length = int(context_length)
        self.vocab_size = len(vocab)

    def encode_roles(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        return _padded_roles(self._tok, _as_list(texts), self.context_length)

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


class HFTokenizer(_Tokenizer):
    """A ``transformers`` tokenizer folder (``save_pretrained``: ``tokenizer.json`` + ``tokenizer_config.json``)
    run on the ``tokenizers`` library, torch-free: the text tower of a diffusers generator's CLAP.

    Tokenises exactly as ``AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
    max_length=model_max_length, truncation=True)`` -- how the AudioLDM / MusicLDM pipelines prompt
    their CLAP -- with the saved pipeline's own normaliser, pre-tokeniser and post-processor, and no
    text cleaning of its own. The vocabulary is whatever the generator ships (no size floor).
    """

    kind = "hf"
    FILES = ("tokenizer.json", "tokenizer_config.json")

    def __init__(self, directory: str | os.PathLike, context_length: int | None = None) -> None:
        import json

        tk = _tokenizers()
        d = Path(directory)
        self.directory = d
        if not (d / "tokenizer.json").is_file():
            raise UserError(
                f"no tokenizer.json in {d}: re-save the generator's tokenizer with transformers "
                "(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) to write it"
            )
        cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
        tok = tk.Tokenizer.from_file(str(d / "tokenizer.json"))
        length = int(context_length if context_length is not None else cfg.get("model_max_length", CONTEXT_LENGTH))
        pad = cfg.get("pad_token", "<pad>")
        pad = pad.get("content", "<pad>") if isinstance(pad, dict) else pad
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise UserError(f"tokenizer in {d} lacks its pad token {pad!r}; wrong files")
        tok.enable_truncation(max_length=length)
        tok.enable_padding(length=length, pad_id=pad_id, pad_token=pad)
        self._tok = tok
        self.context_length = length
        self.vocab_size = tok.get_vocab_size()

    def encode_roles(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        return _padded_roles(self._tok, _as_list(texts), self.context_length)

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy the tokenizer files into ``directory`` (created); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, directory / name)
        return directory

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int | None = None) -> "HFTokenizer":
        p = Path(path)
        return cls(p.parent if p.is_file() else p, context_length)


TOKENIZERS: Mapping[str, type[_Tokenizer]] = {
    ClipBPETokenizer.kind: ClipBPETokenizer, RobertaTokenizer.kind: RobertaTokenizer, HFTokenizer.kind: HFTokenizer,
}


def load_tokenizer(kind: str, directory: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH):
    """The tokenizer an IOSpec's ``meta["tokenizer"]`` names, loaded from ``directory``."""
    if kind == ClipBPETokenizer.kind:
        return ClipBPETokenizer.from_file(directory, context_length)
    if kind == RobertaTokenizer.kind:
        if directory is None:
            raise ValueError("a RoBERTa tokenizer needs a directory holding tokenizer.json")
        return RobertaTokenizer.from_file(directory, context_length)
    if kind == HFTokenizer.kind:
        if directory is None:
            raise ValueError("a transformers tokenizer needs its folder (tokenizer.json + tokenizer_config.json)")
        return HFTokenizer.from_file(directory, context_length)
    raise UserError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(TOKENIZERS)}; re-export")


def context_length(io: IOSpec) -> int:
    """The token count the text encoder ``io`` declares (its token-ids tensor's width)."""
    return io.role(ROLE_TOKEN_IDS).feature_shape[0]
