"""diffgap.core.progress: a bar written to a file or a pipe stays a few lines; on a terminal it is tqdm's."""
from __future__ import annotations

import os
import sys
import time

import pytest

from diffgap.core.progress import NON_TTY_INTERVAL_S, progress_bar

UPDATES = 10_000


def _run_loop(**kw) -> float:
    t0 = time.monotonic()
    bar = progress_bar(total=UPDATES, desc="rows", **kw)
    for _ in range(UPDATES):
        bar.update(1)
    bar.close()
    return time.monotonic() - t0


def _max_lines(seconds: float) -> int:
    # the first frame, one per interval that passed (none in a loop this short), the final frame
    return 2 + int(seconds // NON_TTY_INTERVAL_S)


def test_stderr_redirected_to_a_file_gets_a_bounded_number_of_lines(tmp_path, monkeypatch):
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        took = _run_loop()
    text = log.read_bytes().decode()
    lines = text.splitlines()
    assert "\r" not in text  # one frame per line, no carriage-return frames piled on one line
    assert 1 <= len(lines) <= _max_lines(took), lines
    assert f"{UPDATES}/{UPDATES}" in lines[-1]  # the final state is written when the bar closes


def test_unbuffered_tqdm_would_write_a_frame_per_update(tmp_path):
    """What the policy prevents: tqdm with its terminal settings, minus the rate limit, in a file."""
    from tqdm import tqdm

    log = tmp_path / "raw.log"
    with open(log, "w") as f:
        bar = tqdm(total=UPDATES, file=f, mininterval=0, miniters=1)
        for _ in range(UPDATES):
            bar.update(1)
        bar.close()
    assert log.read_bytes().count(b"\r") > UPDATES // 2


def test_pipe_is_rate_limited_like_a_file():
    r, w = os.pipe()
    with os.fdopen(w, "w") as wf:
        took = _run_loop(file=wf)
    with os.fdopen(r) as rf:
        lines = rf.read().splitlines()
    assert 1 <= len(lines) <= _max_lines(took)


def test_terminal_keeps_tqdm_defaults():
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as term:
            bar = progress_bar(total=3, file=term)
            assert bar.mininterval == 0.1  # tqdm's own default
            bar.update(3)
            bar.close()
        assert b"\r" in os.read(master, 65536)  # redrawn in place
    finally:
        os.close(master)
