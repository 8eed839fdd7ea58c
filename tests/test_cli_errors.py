"""diffgap.cli: a user mistake is one line and exit 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import logging
import sys
import types

import pytest

from diffgap import cli
from diffgap.core.errors import UserError


@pytest.fixture()
def failing_command(monkeypatch):
    """A registered subcommand whose run() raises what the test puts in ``raise_``."""
    mod = types.ModuleType("diffgap_test_failing_command")
    mod.HELP = "raise a chosen exception"
    mod.raise_ = None
    mod.add_arguments = lambda p: None

    def run(args):
        raise mod.raise_

    mod.run = run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.COMMANDS, "fail", mod.__name__)
    return mod


@pytest.mark.parametrize("exc", [UserError("--out x is a file; choose a directory"),
                                 FileNotFoundError("data.npz not found; run diffgap synth")])
def test_user_errors_are_one_line_exit_2(failing_command, capsys, exc):
    failing_command.raise_ = exc
    assert cli.main(["fail"]) == 2
    err = capsys.readouterr().err
    assert err == f"diffgap fail: error: {exc}\n"


def test_user_error_traceback_with_verbose(failing_command, capsys, caplog):
    failing_command.raise_ = UserError("bad flag")
    with caplog.at_level(logging.DEBUG, logger="diffgap"):
        assert cli.main(["-v", "fail"]) == 2
    assert capsys.readouterr().err.endswith("diffgap fail: error: bad flag\n")
    rec = [r for r in caplog.records if r.exc_info]
    assert rec and rec[0].exc_info[0] is UserError  # the traceback is logged with -v


@pytest.mark.parametrize("exc", [ValueError("shape mismatch in a library call"), KeyError("missing"),
                                 RuntimeError("boom")])
def test_other_exceptions_propagate_with_traceback(failing_command, exc):
    """A ValueError/KeyError from library code is a bug: not turned into exit 2, with or without -v."""
    failing_command.raise_ = exc
    with pytest.raises(type(exc)):
        cli.main(["fail"])
    with pytest.raises(type(exc)):
        cli.main(["-v", "fail"])


# -- the runtime commands (index, search, build-engines) keep the same contract ------------------
@pytest.fixture(scope="module")
def export_and_pairs(tmp_path_factory):
    """A small real export (onnxruntime graphs) and a paired-embedding file to index."""
    import numpy as np
    import runtime_graphs as rg

    from diffgap.core.data import save_pairs

    root = tmp_path_factory.mktemp("cli_errors")
    man = rg.make_export(root / "export", sampler_max_batch=8)
    rng = np.random.default_rng(0)
    audio, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.standard_normal((2, 12, rg.E)).astype(np.float32))
    ids = np.array([f"clip{i}" for i in range(12)])
    npz = save_pairs(root / "pairs.npz", ids=ids, audio=audio, text=text, captions=np.array([f"caption {i}" for i in ids]))
    return man, npz


def _index_args(man, npz, out):
    return ["index", str(man.root), "--npz", str(npz), "--out", str(out), "--quiet"]


def _one_line(err: str, command: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"diffgap {command}: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture()
def break_onnxruntime(monkeypatch):
    """Call it to make onnxruntime raise from inside every run, as its own RuntimeException does: a
    failure of the library or the machine, not of anything the user typed."""
    import onnxruntime

    def run(self, *a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated kernel failure")

    return lambda: monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)


def test_index_internal_failure_keeps_its_traceback(export_and_pairs, tmp_path, break_onnxruntime):
    man, npz = export_and_pairs
    break_onnxruntime()
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        cli.main(_index_args(man, npz, tmp_path / "gallery"))


def test_search_internal_failure_keeps_its_traceback(export_and_pairs, tmp_path, break_onnxruntime):
    man, npz = export_and_pairs
    assert cli.main(_index_args(man, npz, tmp_path / "gallery")) == 0
    break_onnxruntime()
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        cli.main(["search", "a dog barks", "--index", str(tmp_path / "gallery")])


def test_runtime_user_mistakes_stay_one_line(export_and_pairs, tmp_path, capsys):
    man, npz = export_and_pairs
    out = tmp_path / "gallery"
    assert cli.main(_index_args(man, npz, out)) == 0
    capsys.readouterr()
    assert cli.main(_index_args(man, npz, out)) == 2  # the output exists
    assert "pass --overwrite" in _one_line(capsys.readouterr().err, "index")
    assert cli.main(["index", str(man.root), "--audio-dir", str(tmp_path), "--out", str(tmp_path / "g2")]) == 2
    assert "no audio files" in _one_line(capsys.readouterr().err, "index")
    assert cli.main(["search", "--audio", str(tmp_path / "missing.wav"), "--index", str(out)]) == 2
    assert "missing.wav: missing" in _one_line(capsys.readouterr().err, "search")
    (tmp_path / "notes.txt").write_text("not audio")
    assert cli.main(["search", "--audio", str(tmp_path / "notes.txt"), "--index", str(out)]) == 2
    assert "notes.txt: not-audio" in _one_line(capsys.readouterr().err, "search")
    assert cli.main(["build-engines", str(man.root), "--models", "no_such_model"]) == 2
    assert "no_such_model" in _one_line(capsys.readouterr().err, "build-engines")


def test_a_backend_this_host_lacks_is_one_line(export_and_pairs, tmp_path, capsys):
    """Choosing TensorRT on a host without it is a choice the user can change: one line, exit 2."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed on this host, so choosing it is no mistake here")
    man, npz = export_and_pairs
    assert cli.main(["build-engines", str(man.root)]) == 2
    assert "pip install" in _one_line(capsys.readouterr().err, "build-engines")
    assert cli.main([*_index_args(man, npz, tmp_path / "gallery"), "--backend", "tensorrt"]) == 2
    assert "tensorrt" in _one_line(capsys.readouterr().err, "index")


def test_negative_head_mlp_width_is_a_one_line_error(tmp_path, capsys):
    import numpy as np

    from diffgap.core.data import save_pairs

    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    data = tmp_path / "d.npz"
    save_pairs(data, audio=unit(rng.standard_normal((80, 512))), text=unit(rng.standard_normal((80, 512))),
               ids=[str(i) for i in range(80)])
    rc = cli.main(["train", "--data", str(data), "--val", str(data), "--out", str(tmp_path / "ck"),
                   "--preset", "clap-tiny", "--head-mlp-hidden", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--head-mlp-hidden must be >= 0" in err[0]
