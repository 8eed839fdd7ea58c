"""diffgap.core.tokenizer: CLIP BPE on `tokenizers` == laion-clap's bundled ``tokenize``; RoBERTa == transformers."""
import gzip
import json
import random

import numpy as np
import pytest

from diffgap.core.errors import UserError
from diffgap.core.iospec import ROLE_ATTENTION_MASK, ROLE_TOKEN_IDS, ROLES, IOSpec, TensorSpec
from diffgap.core.tokenizer import (CLIP_VOCAB_FILENAME, ClipBPETokenizer, RobertaTokenizer, bundled_clip_vocab,
                               load_tokenizer)


def _strings() -> list[str]:
    fixed = [
        "", " ", "a dog barks", "A Dog BARKS!!", "  multiple   spaces\tand\nnewlines  ",
        "Ünïcödé café naïve — “curly quotes” 日本語の音声 😀🎵 Ελληνικά русский",
        "&amp;lt;b&amp;gt; html &quot;entities&quot; &#39;x&#39;", "mojibake: Ã©tÃ© cafÃ©",
        "<start_of_text> specials <end_of_text> inside", "I'm sure it's they've we'll you'd I'LL",
        "1234567890 3.14159 x2 mp3 44.1kHz", "!!!???... ---- ~~~ @@@ ###", "tab\u00a0nbsp\u2003emspace\u200bzw",
        "word " * 200, "a" * 600, "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "\x00\x01 control \x7f chars", "🎹" * 100,
    ]
    rng = random.Random(1234)
    pool = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x400, 0x450), *range(0x3040, 0x30FF),
                             *range(0x4E00, 0x4E40), 0x1F600, 0x1F3B5, 0x200B, 0x2019, 0x2014, 0x0301]]
    words = ["dog", "bark", "rain", "engine", "whistle", "crowd", "applause", "the", "a", "of", "is", "loud"]
    rand = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 150))) for _ in range(300)]
    sent = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(100)]
    return fixed + rand + sent


STRINGS = _strings()


@pytest.fixture(scope="module")
def tok():
    return ClipBPETokenizer.from_file()


def test_equals_laion_tokenize(tok):
    from laion_clap.clap_module.tokenizer import tokenize

    ours = tok(STRINGS)
    ref = tokenize(STRINGS).numpy()
    assert ours.dtype == np.int64 and ours.shape == (len(STRINGS), 77)
    bad = np.where((ours != ref).any(1))[0]
    assert bad.size == 0, [STRINGS[i] for i in bad[:5]]
    assert tok.vocab_size == 49408


def test_single_string_and_feeds(tok):
    ids = tok("a dog barks")
    assert ids.shape == (1, 77) and ids[0, 0] == tok.sot and tok.eot in ids[0]
    assert tok.encode_roles(["x", "y"])["token_ids"].shape == (2, 77)
    # overlong: truncated after adding the end token (laion-clap), so no end token survives
    long = tok("word " * 200)[0]
    assert (long != 0).all() and tok.eot not in long


def _text_io(mask: bool) -> IOSpec:
    """A text encoder declaration whose tensor names differ from any tokenizer's: feeds must follow roles."""
    ids = TensorSpec("tok", "int64", ("batch", 77))
    m = TensorSpec("valid", "int32", ("batch", 77))
    roles = {ROLE_TOKEN_IDS: ids.name, **({ROLE_ATTENTION_MASK: m.name} if mask else {})}
    return IOSpec("enc", (ids, m) if mask else (ids,), (TensorSpec("e", "float32", ("batch", 4)),), meta={ROLES: roles})


def test_feeds_keyed_by_the_encoders_roles(tok):
    texts = ["a dog barks", "word " * 100]
    feeds = tok.feeds(texts, _text_io(mask=False))
    assert list(feeds) == ["tok"]
    np.testing.assert_array_equal(feeds["tok"], tok(texts))
    feeds = tok.feeds(texts, _text_io(mask=True))
    assert list(feeds) == ["tok", "valid"] and feeds["valid"].dtype == np.int32
    np.testing.assert_array_equal(feeds["valid"], (feeds["tok"] != 0).astype(np.int32))
    with pytest.raises(ValueError, match="predates tensor roles"):
        tok.feeds(texts, IOSpec("old", (TensorSpec("input_ids", "int64", ("batch", 77)),), (TensorSpec("e", "float32", ("batch", 4)),)))
    short = IOSpec("enc", (TensorSpec("tok", "int64", ("batch", 64)),), (TensorSpec("e", "float32", ("batch", 4)),),
                   meta={ROLES: {ROLE_TOKEN_IDS: "tok"}})
    with pytest.raises(UserError, match="writes 77 tokens"):
        tok.feeds(texts, short)


def test_save_and_reload_in_export_dir(tok, tmp_path):
    path = tok.save(tmp_path / "export")
    assert path.name == CLIP_VOCAB_FILENAME and path.read_bytes() == bundled_clip_vocab().read_bytes()
    back = ClipBPETokenizer.from_file(tmp_path / "export")
    np.testing.assert_array_equal(back(STRINGS[:50]), tok(STRINGS[:50]))
    assert load_tokenizer("clip-bpe", path).vocab_size == tok.vocab_size
    # a plain-text (un-gzipped) copy loads too
    (tmp_path / "plain.txt").write_bytes(gzip.decompress(bundled_clip_vocab().read_bytes()))
    np.testing.assert_array_equal(ClipBPETokenizer.from_file(tmp_path / "plain.txt")(STRINGS[:20]), tok(STRINGS[:20]))


def test_bad_vocab_files_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ClipBPETokenizer.from_file(tmp_path / "nope.txt.gz")
    (tmp_path / "tiny.txt").write_text("#version: 0.2\ni n\nt h\n")
    with pytest.raises(UserError, match="only .* tokens"):
        ClipBPETokenizer.from_file(tmp_path / "tiny.txt")
    (tmp_path / "broken.txt").write_text("#version\n" + "i n\n" * 10 + "garbage\n")
    with pytest.raises(UserError, match="line 12 is not"):
        ClipBPETokenizer.from_file(tmp_path / "broken.txt")
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer("sentencepiece", tmp_path)


# -- RoBERTa -------------------------------------------------------------------------------
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta-base's ids 0..4


def _train_bpe(directory, vocab_size):
    """A small byte-level BPE in roberta-base's file layout (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    corpus = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(30))
              for _ in range(3000)]
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    t.save_model(str(directory))
    return directory


@pytest.fixture(scope="module")
def roberta_files(tmp_path_factory):
    return _train_bpe(tmp_path_factory.mktemp("roberta"), 1500)


def test_roberta_matches_transformers(roberta_files):
    """Torch-free RoBERTa tokenisation == transformers' RobertaTokenizer with laion-clap's settings."""
    from transformers import RobertaTokenizer as HFRoberta

    ours = RobertaTokenizer(roberta_files)
    hf = HFRoberta(vocab=str(roberta_files / "vocab.json"), merges=str(roberta_files / "merges.txt"))
    texts = ["a dog barks", "", "Ünïcödé 日本 😀", "abc def " * 60, "  spaced   out  "] + STRINGS[20:60]
    ref = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    feeds = ours.encode_roles(texts)
    np.testing.assert_array_equal(feeds["token_ids"], ref["input_ids"])
    np.testing.assert_array_equal(feeds["attention_mask"], ref["attention_mask"])
    assert feeds["token_ids"].dtype == np.int64


def test_roberta_save_reload(roberta_files, tmp_path):
    ours = RobertaTokenizer(roberta_files)
    path = ours.save(tmp_path / "export")
    back = load_tokenizer("roberta", path.parent)
    np.testing.assert_array_equal(back(STRINGS[:30]), ours(STRINGS[:30]))


def test_roberta_placeholder_vocab_refused(tmp_path):
    """Offline RobertaTokenizer fallbacks carry ~5 tokens; such a vocabulary is refused."""
    d = tmp_path / "placeholder"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(SPECIALS)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match="only 5 tokens"):
        RobertaTokenizer(d)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        RobertaTokenizer(tmp_path / "empty")
