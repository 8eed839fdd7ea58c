"""``diffgap embed``: AudioCaps/Clotho/sidecar inputs -> paired .npz; skips with reasons; resumable."""
import csv

import numpy as np
import pytest
import soundfile as sf

from diffgap.core.errors import UserError
from diffgap import cli
from diffgap.core.data import load_pairs
from diffgap.encoders import dataset as D
from diffgap.encoders.clap import ClapEncoder


def tone(freq, seconds, sr, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x, 0.5 * x], 1) if channels == 2 else x


@pytest.fixture(scope="module")
def enc():
    return ClapEncoder.from_arch("tiny", seed=0)


@pytest.fixture()
def clotho(tmp_path):
    root = tmp_path / "clotho"
    root.mkdir()
    sf.write(root / "a.wav", tone(300, 1.0, 16000), 16000)
    sf.write(root / "b.flac", tone(900, 2.5, 44100, channels=2), 44100)
    sf.write(root / "c.wav", tone(2000, 12.0, 48000), 48000)        # longer than 10 s
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("not audio at all\n" * 50)
    good = (root / "a.wav").read_bytes()
    (root / "broken.wav").write_bytes(good[:12] + bytes(range(256)) * 8)
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"])
        for name in ("a.wav", "b.flac", "c.wav", "empty.wav", "notes.wav", "broken.wav", "missing.wav"):
            w.writerow([name] + [f"{name} caption {j}" for j in range(1, 6)])
    return root


def test_clotho_pairs_and_skips(clotho, enc, tmp_path):
    out = tmp_path / "pairs.npz"
    plan = D.plan_from_csv(clotho / "captions.csv")
    path, skipped = D.embed_plan(plan, enc, out, batch_size=2, progress=False)
    pairs = load_pairs(path, embed_dim=512, require=("audio", "text"))
    assert len(pairs) == 15  # a, b, c x 5 captions
    assert pairs.ids[0] == "a.wav#1" and pairs.captions[0] == "a.wav caption 1"
    reasons = dict(skipped)
    assert reasons["empty.wav"].startswith("empty-file")
    assert reasons["notes.wav"].startswith("not-audio")
    assert reasons["broken.wav"].startswith("corrupt")
    assert "no audio file" in reasons["missing.wav#1"]
    assert (tmp_path / "pairs.skipped.tsv").read_text().count("\n") == len(skipped)
    assert not (tmp_path / ".pairs.npz.embed-parts").exists()
    # rows equal the encoder called directly (same data path)
    direct_audio = enc.encode_audio([sf.read(clotho / "b.flac", dtype="float32")[0]], sample_rate=44100)
    np.testing.assert_allclose(pairs["audio"][5], direct_audio[0], atol=1e-6)
    np.testing.assert_allclose(pairs["text"][7], enc.encode_text(["b.flac caption 3"])[0], atol=1e-6)
    np.testing.assert_array_equal(pairs["audio"][0], pairs["audio"][4])  # one audio, five captions


def test_audiocaps_layout(tmp_path, enc):
    root = tmp_path / "ac"
    root.mkdir()
    sf.write(root / "yt1_30.wav", tone(500, 1.0, 32000), 32000)      # <youtube_id>_<start_time>
    sf.write(root / "1002.wav", tone(700, 1.0, 48000), 48000)        # <audiocap_id>
    sf.write(root / "Yyt3.wav", tone(800, 1.0, 48000), 48000)        # Y<youtube_id>
    rows = [("1001", "yt1", "30", "a hum"), ("1002", "yt2", "0", "a whistle"), ("1003", "yt3", "10.0", "beeping"),
            ("1004", "yt4", "5", "nothing here")]
    with open(tmp_path / "audiocaps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows(rows)
    plan = D.plan_from_csv(tmp_path / "audiocaps.csv", root)
    assert [(p.id, p.audio) for p in plan.pairs] == [("1001", "yt1_30.wav"), ("1002", "1002.wav"), ("1003", "Yyt3.wav")]
    assert plan.skipped[0][0] == "1004" and "no audio file" in plan.skipped[0][1]
    _, skipped = D.embed_plan(plan, enc, tmp_path / "ac.npz", progress=False)
    assert len(load_pairs(tmp_path / "ac.npz")) == 3 and len(skipped) == 1


def test_unknown_csv_columns(tmp_path):
    (tmp_path / "x.csv").write_text("path,text\na.wav,hello\n")
    with pytest.raises(UserError, match="unknown caption columns"):
        D.plan_from_csv(tmp_path / "x.csv")


def test_sidecar_folder(tmp_path, enc):
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "dog.wav", tone(400, 1.0, 16000), 16000)
    (root / "dog.txt").write_text("a dog barks\n\nthe dog barks twice\n")
    sf.write(root / "sub" / "car.wav", tone(100, 1.0, 16000), 16000)
    (root / "sub" / "car.txt").write_text("a car passes\n")
    sf.write(root / "nocap.wav", tone(100, 1.0, 16000), 16000)
    plan = D.plan_from_folder(root)
    assert [p.id for p in plan.pairs] == ["dog.wav#1", "dog.wav#2", "sub/car.wav#1"]
    assert plan.skipped[0][0] == "nocap.wav"
    D.embed_plan(plan, enc, tmp_path / "side.npz", progress=False)
    assert load_pairs(tmp_path / "side.npz").captions.tolist() == ["a dog barks", "the dog barks twice", "a car passes"]


def test_resume_after_interruption(clotho, enc, tmp_path):
    plan = D.plan_from_csv(clotho / "captions.csv")
    ref, _ = D.embed_plan(plan, enc, tmp_path / "ref.npz", batch_size=2, progress=False)

    out = tmp_path / "resumed.npz"
    done = []

    def interrupt_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        D.embed_plan(plan, enc, out, batch_size=2, progress=False, on_shard=interrupt_after_two)
    assert not out.exists()  # never a half-written npz
    parts = tmp_path / ".resumed.npz.embed-parts"
    assert sorted(p.name for p in parts.glob("*_*.npz")) == sorted(done)

    second = []
    D.embed_plan(plan, enc, out, batch_size=2, progress=False, on_shard=second.append)
    assert not set(second) & set(done)  # finished shards were reused, not recomputed
    a, b = load_pairs(ref), load_pairs(out)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a["audio"], b["audio"])
    np.testing.assert_array_equal(a["text"], b["text"])
    assert not parts.exists()


def test_stale_shards_are_discarded(clotho, enc, tmp_path):
    """Shards from another encoder/config are never mixed in."""
    plan = D.plan_from_csv(clotho / "captions.csv")
    out = tmp_path / "p.npz"

    def stop(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        D.embed_plan(plan, enc, out, batch_size=2, progress=False, on_shard=stop)
    calls = []
    D.embed_plan(plan, enc, out, batch_size=3, progress=False, on_shard=calls.append)  # different chunking
    assert len(calls) == len(D._chunks(plan.audio_files, 3)) + len(D._chunks(plan.captions, 64))


def test_cli_embed(clotho, tmp_path, capsys):
    out = tmp_path / "cli.npz"
    argv = ["embed", "--captions", str(clotho / "captions.csv"), "--out", str(out), "--arch", "tiny",
            "--batch-size", "4", "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "15 pairs" in captured.out
    assert "skipped notes.wav: not-audio" in captured.err
    assert len(load_pairs(out)) == 15
    assert cli.main(argv) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["embed", "--out", str(tmp_path / "x.npz")]) == 2
    assert cli.main(["embed", "--audio-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.npz")]) == 2
    assert cli.main(["embed", "--captions", str(clotho / "captions.csv"), "--out", str(tmp_path / "y.npz"),
                     "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()


def test_demo_embed(tmp_path):
    from diffgap.encoders.clap_demo import demo_embed

    r = demo_embed(tmp_path / "demo")
    assert r["n_pairs"] == 5 and r["embed_dim"] == 512 and r["unit_norm"]
    assert len(r["text_audio_cosine"]) == 5 and r["first_tokens"][0] == 49406  # <start_of_text>
    assert len(load_pairs(r["npz"])) == 5
