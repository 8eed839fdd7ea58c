"""`diffgap export` end to end on the tiny presets: files, manifest, metadata, parity, FP16, bad input.

One session-scoped export (clap-tiny checkpoint + the ``tiny`` CLAP architecture, ``--check``) feeds
most tests. Parity bounds (diffgap.export.check): FP32 graphs vs PyTorch max abs <= 1e-4 (ORT CPU); FP16 vs
PyTorch FP32 row cosine >= 0.999 for the samplers (onnx.reference, real float16 arithmetic) and
>= 0.995 for the encoders (ORT CPU: weight/cast rounding only, see diffgap.export.check).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt.onnx.autocast")
pytest.importorskip("laion_clap")

from diffgap import __version__  # noqa: E402
from diffgap.checkpoint import WEIGHTS, save_checkpoint  # noqa: E402
from diffgap.cli import main as cli_main  # noqa: E402
from diffgap.export import check as chk  # noqa: E402
from diffgap.export.cli import ExportCheckError, export_all  # noqa: E402
from diffgap.export.lint import lint_model  # noqa: E402
from diffgap.export.onnx_export import META_IOSPEC, read_metadata  # noqa: E402
from diffgap.core.fsutil import sha256_file  # noqa: E402
from diffgap.core.iospec import IOSpec  # noqa: E402
from diffgap.core.manifest import Manifest  # noqa: E402
from diffgap.core.names import head_name  # noqa: E402

from test_export_fused import randomized_model  # noqa: E402

EXPECTED = ("clap_text_encoder", "clap_audio_encoder", "diffgap_text_to_audio", "diffgap_audio_to_text",
            head_name("text"), head_name("audio"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export_ckpt") / "ckpt"
    save_checkpoint(path, randomized_model(), meta={"step": 0})
    return path


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_out") / "export"
    res = export_all(tiny_checkpoint, out, steps=6, encoders="tiny", check=True)
    return res


def test_files_and_manifest(exported, tiny_checkpoint):
    out = exported.out
    names = sorted(p.name for p in out.iterdir())
    for m in EXPECTED:
        assert f"{m}.onnx" in names and f"{m}.fp16.onnx" in names
    assert "manifest.json" in names and "bpe_simple_vocab_16e6.txt.gz" in names
    assert not [n for n in out.parent.iterdir() if n.name.endswith(".partial")]
    man = Manifest.load(out, verify=True)
    assert set(man.models) == set(EXPECTED)
    assert man.preset == "clap-tiny" and man.embed_dim == 512 and man.package_version == __version__
    assert man.checkpoint_sha256 == sha256_file(tiny_checkpoint / WEIGHTS)
    assert man.asset("tokenizer").is_file()
    for name, entry in man.models.items():
        for prec in ("fp32", "fp16"):
            rel = entry.file(prec)
            assert man.files[rel]["sha256"] == sha256_file(out / rel)
    fused = man.model("diffgap_text_to_audio")
    assert fused.meta["steps"] == 6 and fused.meta["bridge_mode"] == "noise"
    assert fused.io.input_names[:2] == ["condition", "noise"]
    assert man.extra["parity"]["ok"] is True
    assert all(v["ok"] for v in man.extra["lint"].values())
    # readable by a server running as another user (temp files are created 0600): umask defaults
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_metadata_props(exported, tiny_checkpoint):
    man = Manifest.load(exported.out)
    for name in EXPECTED:
        for prec in ("fp32", "fp16"):
            meta = read_metadata(man.path(name, prec))
            assert meta["diffgap.preset"] == "clap-tiny"
            assert meta["diffgap.embed_dim"] == "512"
            assert meta["diffgap.package_version"] == __version__
            assert meta["diffgap.checkpoint_sha256"] == sha256_file(tiny_checkpoint / WEIGHTS)
            assert meta["diffgap.precision"] == prec
            assert IOSpec.from_dict(json.loads(meta[META_IOSPEC])) == man.model(name).io
            if name.startswith("diffgap_"):
                assert meta["diffgap.K"] == "6"
                assert meta["diffgap.schedule"] == "cosine"
                assert meta["diffgap.bridge_mode"] == "noise"
                assert meta["diffgap.steps"] == "6"


def test_parity_figures_within_bounds(exported):
    # export_all(check=True) raises unless every row is ok, so the figures themselves are checked here
    # (and test_failed_parity_check_raises_and_writes_nothing shows a missed bound does raise).
    par = exported.parity
    for name in EXPECTED:
        row = par["models"][name]
        assert row["batches"] == [1, 3, 8]  # encoder batch freeze (window_reverse) would fail B != 2
        assert row["fp32_max_abs"] <= chk.FP32_MAX_ABS
        bound = chk.FP16_MIN_COS_DENOISER if name.startswith("diffgap_") else chk.FP16_MIN_COS_ENCODER
        assert row["fp16_min_cos"] >= bound
        # real FP16 arithmetic (onnx.reference) everywhere but the audio tower (ORT CPU, rounding only)
        assert row["fp16_measure"] == (chk.MEASURE_FP16_ORT if name == "clap_audio_encoder" else chk.MEASURE_FP16_REF)
    assert "fp16 min cos" in exported.table


def test_fp16_graphs_are_strongly_typed_with_fp32_io(exported):
    man = Manifest.load(exported.out)
    for name in EXPECTED:
        m16 = onnx.load(str(man.path(name, "fp16")))
        io = man.model(name).io
        for vi, spec in zip([*m16.graph.input, *m16.graph.output], [*io.inputs, *io.outputs]):
            assert vi.name == spec.name
            assert onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) == spec.np_dtype
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m16.graph.initializer)
        assert lint_model(m16).ok


def test_timestep_embedding_mul_stays_fp32(tmp_path):
    """With a *dynamic* timestep (not folded away), the t*freq Mul, Sin and Cos stay FP32."""
    from torch import nn

    from diffgap.export.fp16 import convert_fp16
    from diffgap.export.onnx_export import export_module
    from diffgap.core.iospec import IOSpec, TensorSpec
    from diffgap.models import timestep_features

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 16)

        def forward(self, x, t):  # x: (B, 16), t: (B, 1) float timesteps
            return x + self.lin(timestep_features(t[:, 0], 32))

    io = IOSpec("tnet", (TensorSpec("x", "float32", ("batch", 16)), TensorSpec("t", "float32", ("batch", 1), low=0, high=999)),
                (TensorSpec("y", "float32", ("batch", 16)),))
    export_module(Net().eval(), io, tmp_path / "t.onnx", simplify=False)
    m16 = convert_fp16(tmp_path / "t.onnx", tmp_path / "t.fp16.onnx", io, kind="denoiser",
                       calibration=io.sample_inputs(4, seed=1))
    inferred = onnx.shape_inference.infer_shapes(m16)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    trig = [n for n in m16.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig
    for n in trig:
        assert types[n.output[0]] == onnx.TensorProto.FLOAT
        mul = next(p for p in m16.graph.node if n.input[0] in p.output)
        assert mul.op_type == "Mul" and types[mul.output[0]] == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m16.graph.initializer)  # the Linear is FP16


# ---- bad input: one clear line, exit 2, nothing written ---------------------------------------
def _cli(args, capsys):
    rc = cli_main(["export", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_missing_checkpoint(tmp_path, capsys):
    rc, err = _cli([tmp_path / "nope", "--out", tmp_path / "o", "--encoders", "none"], capsys)
    assert rc == 2 and "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint(tiny_checkpoint, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / WEIGHTS).write_bytes((bad / WEIGHTS).read_bytes()[:100])
    rc, err = _cli([bad, "--out", tmp_path / "o", "--encoders", "none"], capsys)
    assert rc == 2 and "corrupt" in err and len(err.splitlines()) == 1
    (bad / "config.json").write_text("{not json")
    rc, err = _cli([bad, "--out", tmp_path / "o", "--encoders", "none"], capsys)
    assert rc == 2 and "not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_preset(tiny_checkpoint, tmp_path, capsys):
    rc, err = _cli([tiny_checkpoint, "--out", tmp_path / "o", "--preset", "clap-512", "--encoders", "none"], capsys)
    assert rc == 2 and "clap-tiny" in err and "clap-512" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("k", ["0", "-3", "1001"])
def test_steps_out_of_range(tiny_checkpoint, tmp_path, capsys, k):
    rc, err = _cli([tiny_checkpoint, "--out", tmp_path / "o", "--steps", k, "--encoders", "none"], capsys)
    assert rc == 2 and "--steps" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_steps_beyond_source_start(tiny_checkpoint, tmp_path, capsys):
    rc, err = _cli([tiny_checkpoint, "--out", tmp_path / "o", "--steps", "500", "--bridge-mode", "source",
                    "--encoders", "none"], capsys)
    assert rc == 2 and "t0" in err


def test_unwritable_out_dir(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _cli([tiny_checkpoint, "--out", blocker / "sub", "--encoders", "none"], capsys)
    assert rc == 2 and "not a directory" in err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc, err = _cli([tiny_checkpoint, "--out", ro / "o", "--encoders", "none"], capsys)
            assert rc == 2 and "writable" in err
        finally:
            ro.chmod(0o700)


def test_existing_out_dir_needs_overwrite(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _cli([tiny_checkpoint, "--out", out, "--encoders", "none"], capsys)
    assert rc == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """A failure after some graphs were written: no partial dir, an existing dir is left untouched."""
    import diffgap.export.fp16 as fp16

    def boom(*a, **k):
        raise RuntimeError("simulated failure in the FP16 step")

    monkeypatch.setattr(fp16, "convert_fp16", boom)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="simulated"):
        export_all(tiny_checkpoint, out, steps=2, encoders=None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="simulated"):
        export_all(tiny_checkpoint, out, steps=2, encoders=None, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_failed_parity_check_raises_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """A real parity figure against an impossible bound (FP32 max |d| <= 0): ExportCheckError, the table
    still reaches on_table, the failing model is named and nothing is left behind."""
    import dataclasses

    real = chk.check_model
    monkeypatch.setattr(chk, "check_model", lambda *a, **k: dataclasses.replace(real(*a, **k), fp32_bound=0.0))
    tables = []
    out = tmp_path / "o"
    with pytest.raises(ExportCheckError, match=r"parity check failed for \['diffgap_text_to_audio'") as e:
        export_all(tiny_checkpoint, out, steps=2, encoders=None, fp16=False, check=True, on_table=tables.append)
    assert tables == [e.value.table] and " NO" in e.value.table
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_samplers_only_export_via_cli(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli_main(["export", str(tiny_checkpoint), "--out", str(out), "--steps", "3", "--encoders", "none",
                   "--bridge-mode", "noise", "--no-guidance-input"])
    assert rc == 0, capsys.readouterr().err
    man = Manifest.load(out, verify=True)
    assert set(man.models) == {"diffgap_text_to_audio", "diffgap_audio_to_text", head_name("text"), head_name("audio")}
    m = man.model("diffgap_audio_to_text")
    assert m.io.input_names == ["condition", "noise"] and m.meta["bridge_mode"] == "noise" and m.meta["steps"] == 3
    assert "exported 4 models" in capsys.readouterr().out
