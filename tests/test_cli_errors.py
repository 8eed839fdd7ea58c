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
