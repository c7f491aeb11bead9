"""Ctrl-C that a library swallowed still stops `essa align` between iterations and inside evaluations."""

import io
import os
import signal
import time

import pytest
from rich.console import Console

from essa import interrupts
from essa.progress import ChunkSteps


@pytest.fixture
def python_sigint():
    """Python's usual SIGINT handler for the test, whatever the test process was started with (a shell's
    background job starts with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_swallowed_sigint_is_raised_again_by_check(python_sigint):
    with interrupts.recorded():
        interrupts.check()  # nothing received yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
            pytest.fail("SIGINT raised nothing")
        except KeyboardInterrupt:
            pass  # as a library that catches BaseException would
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts.recorded():
        interrupts.check()  # a new run starts with nothing received


def test_a_swallowed_sigint_stops_an_evaluation_at_its_next_decode_step(python_sigint):
    progress = ChunkSteps(Console(file=io.StringIO()), "held-out chunks")
    with interrupts.recorded():
        progress.rows(1, 8, 10)  # nothing received yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            pytest.fail("SIGINT raised nothing")
        except KeyboardInterrupt:
            pass  # swallowed mid-step, as by a library
        with pytest.raises(KeyboardInterrupt):
            progress.rows(2, 8, 20)
        with pytest.raises(KeyboardInterrupt):
            progress(1, 4)
    progress.rows(3, 8, 30)  # outside a run nothing is remembered
