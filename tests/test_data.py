"""The paired-embedding .npz format: round trip and every documented refusal."""
import numpy as np
import pytest

from diffgap.core.data import load_pairs, save_pairs


def _arrays(n=5, e=8, seed=0):
    rng = np.random.default_rng(seed)
    return dict(ids=[f"id{i}" for i in range(n)], audio=rng.standard_normal((n, e)).astype(np.float32),
                text=rng.standard_normal((n, e)).astype(np.float32), captions=[f"cap {i}" for i in range(n)])


def test_round_trip(tmp_path):
    a = _arrays()
    save_pairs(tmp_path / "p.npz", **a)
    p = load_pairs(tmp_path / "p.npz")
    assert len(p) == 5 and p.embed_dim == 8 and set(p.modalities) == {"audio", "text"}
    np.testing.assert_array_equal(p["audio"], a["audio"])
    assert list(p.ids) == a["ids"] and list(p.captions) == a["captions"]
    assert [f.name for f in tmp_path.iterdir()] == ["p.npz"], "no temp files left behind"


def test_float64_and_float16_load_as_float32(tmp_path):
    a = _arrays()
    a["audio"] = a["audio"].astype(np.float64)
    a["text"] = a["text"].astype(np.float16)
    np.savez(tmp_path / "p.npz", **{k: np.asarray(v) for k, v in a.items()})
    p = load_pairs(tmp_path / "p.npz")
    assert p["audio"].dtype == np.float32 and p["text"].dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_refused_naming_array_and_row(tmp_path, bad):
    a = _arrays()
    a["text"][3, 2] = bad
    np.savez(tmp_path / "p.npz", **{k: np.asarray(v) for k, v in a.items()})
    with pytest.raises(ValueError, match=r"array 'text' contains NaN/Inf \(first bad row 3\)"):
        load_pairs(tmp_path / "p.npz")
    with pytest.raises(ValueError, match="first bad row 3"):
        save_pairs(tmp_path / "q.npz", **a)
    assert not (tmp_path / "q.npz").exists()


@pytest.mark.parametrize("mutate,msg", [
    (lambda a: a.update(audio=a["audio"][:, :, None]), "array 'audio' must have rank 2"),
    (lambda a: a.update(text=a["text"][:3]), "array 'text' has 3 rows"),
    (lambda a: a.update(audio=a["audio"].astype(np.int32)), "array 'audio' has dtype int32"),
    (lambda a: a.pop("text"), "needs at least two"),
    (lambda a: a.pop("ids"), "array 'ids' is missing"),
    (lambda a: a.update(ids=["x"] * 5), "array 'ids' has duplicates"),
    (lambda a: a.update(captions=["c"] * 2), "array 'captions' must have shape"),
])
def test_invalid_files_refused(tmp_path, mutate, msg):
    a = _arrays()
    mutate(a)
    np.savez(tmp_path / "p.npz", **{k: np.asarray(v) for k, v in a.items()})
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        load_pairs(tmp_path / "p.npz")


def test_embed_dim_and_required_modality(tmp_path):
    save_pairs(tmp_path / "p.npz", **_arrays())
    with pytest.raises(ValueError, match="array 'audio' has embedding dim 8, but the model takes 512-d audio"):
        load_pairs(tmp_path / "p.npz", embed_dim=512)
    with pytest.raises(ValueError, match="array 'text' has embedding dim 8, but the model takes 384-d text"):
        load_pairs(tmp_path / "p.npz", embed_dim={"audio": 8, "text": 384})


def test_modalities_may_differ_in_width(tmp_path):
    a = _arrays()
    a["text"] = a["text"][:, :4]
    p = load_pairs(save_pairs(tmp_path / "p.npz", **a), embed_dim={"audio": 8, "text": 4})
    assert p.dims == {"audio": 8, "text": 4} and p["text"].shape == (5, 4)
    with pytest.raises(ValueError, match="different widths"):
        p.embed_dim
    with pytest.raises(ValueError, match="'video' is required"):
        load_pairs(tmp_path / "p.npz", require=("video", "audio"))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffgap synth"):
        load_pairs(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_pairs(tmp_path / "bad.npz")
    a = _arrays()
    np.savez(tmp_path / "obj.npz", ids=np.array([{"a": 1}] * 5, dtype=object), audio=a["audio"], text=a["text"])
    with pytest.raises(ValueError, match="not objects"):
        load_pairs(tmp_path / "obj.npz")
