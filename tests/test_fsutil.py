"""Atomic writes and versioned-JSON reading (diffgap.core.fsutil): what every file diffgap writes relies on."""
import json

import pytest

from diffgap.core.fsutil import atomic_dir, atomic_write_json, read_versioned_json


def test_atomic_write_json_replaces_whole_file(tmp_path):
    p = tmp_path / "doc.json"
    atomic_write_json(p, {"format": "x/1", "a": 1})
    atomic_write_json(p, {"format": "x/1", "a": 2})
    assert json.loads(p.read_text()) == {"format": "x/1", "a": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["doc.json"]  # no temporary left behind


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_read_versioned_json(tmp_path):
    p = tmp_path / "meta.json"
    atomic_write_json(p, {"format": "thing/1", "v": 3})
    assert read_versioned_json(p, "thing/1", "thing metadata", "remake it")["v"] == 3
    p.write_text("{not json")
    with pytest.raises(ValueError, match=r"^thing metadata .*meta.json is not valid JSON \(.* at line 1\); remake it$"):
        read_versioned_json(p, "thing/1", "thing metadata", "remake it")
    for doc, found in (({"format": "thing/2"}, "'thing/2'"), ({}, "None"), ([1, 2], "None")):
        p.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=rf"has format {found}, expected 'thing/1'; remake it$"):
            read_versioned_json(p, "thing/1", "thing metadata", "remake it")
