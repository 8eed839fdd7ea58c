"""Progress bars (tqdm) that suit where they are written.

On a terminal a bar redraws in place, as tqdm does by default. Anywhere else (a file, a pipe, a CI
log) each redraw would stay in the output: tqdm separates frames with a carriage return and draws one
every ``mininterval`` (0.1 s by default), so a long loop leaves thousands of frames on one line.
There :func:`progress_bar` draws at most one frame every :data:`NON_TTY_INTERVAL_S` seconds, each on
a line of its own, and the final state when the bar closes. In a notebook, tqdm's own widget is used.
"""
from __future__ import annotations

import sys
from typing import IO, Any, Iterable

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm

# tqdm.auto picks tqdm's notebook widget inside a Jupyter kernel (whose stderr is no terminal either).
_IN_NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in _auto_tqdm.__mro__)

# Seconds between frames when not on a terminal: a line every 30 s keeps a day-long run's log to
# about 3000 lines per bar while still showing that it moves.
NON_TTY_INTERVAL_S = 30.0


class _LineStream:
    """A text stream that writes each carriage-return frame of tqdm as a line of its own.

    tqdm starts every frame with ``\\r`` and pads it with spaces to cover the previous one; a log wants
    the frame text alone, ended by a newline. Blank frames (a cleared bar) are dropped.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        lines = [part.rstrip() for part in s.replace("\r", "\n").split("\n")]
        text = "".join(f"{line}\n" for line in lines if line)
        if text:
            self._stream.write(text)
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno ...: the wrapped stream's
        return getattr(self._stream, name)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, file: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` writing to ``file`` (default: ``sys.stderr`` at call time).

    Not on a terminal: a frame at most every :data:`NON_TTY_INTERVAL_S` seconds (unless the caller
    sets ``mininterval``), one line per frame.
    """
    stream = sys.stderr if file is None else file
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    if file is None and _IN_NOTEBOOK:
        return _auto_tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", NON_TTY_INTERVAL_S)
    # tqdm's monitor thread forces a frame after maxinterval (default 10 s) of silence: keep it in step.
    kwargs.setdefault("maxinterval", max(kwargs["mininterval"], NON_TTY_INTERVAL_S))
    kwargs.setdefault("dynamic_ncols", False)
    return tqdm(iterable, file=_LineStream(stream), **kwargs)
