"""Ctrl-C that stops a run even where a library swallowed it.

Python raises KeyboardInterrupt in whatever code the main thread runs when SIGINT arrives. Code
that catches it there (a library's `except BaseException`, or a finalizer running at that moment,
whose exceptions Python only prints) loses it, and the run goes on. Under `recorded`, the signal
is also remembered, and `essa align` calls `check` between iterations and an evaluation's progress
calls it after every decode step: a Ctrl-C that was lost stops the run there, with the same message
and intact checkpoints (an IFEval held-out evaluation runs for minutes). Why: the Ctrl-C tests' runs
went on after their SIGINT, intermittently (CI, 2026-12-03), although Python's handler was
installed and no thread blocked SIGINT (checked in /proc/PID/status).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_received = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


@contextmanager
def recorded() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt as usual and is remembered for `check` (main thread only:
    Python runs signal handlers there)."""
    global _received
    _received = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received = False  # what follows in this process (a test, a notebook cell) starts uninterrupted


def check() -> None:
    """KeyboardInterrupt if a SIGINT arrived under `recorded`, whether or not it was caught since."""
    if _received:
        raise KeyboardInterrupt
