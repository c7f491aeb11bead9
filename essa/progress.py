"""Progress that works anywhere: a live bar on a terminal, plain flushed lines everywhere else.

rich draws its bars and spinners only on a terminal, so under nohup, Slurm or CI a run printed
nothing between its first and last lines. Here every long step says when it starts and ends, and
every iteration or chunk of work is one line with its own numbers, elapsed time and ETA.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from essa import interrupts


def quiet_third_party() -> None:
    """Silence the load bars and info logs of transformers and the hub, which say nothing a user can
    act on (essa's own lines say what is loading and for how long); their warnings and errors stay."""
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    datasets_quiet()


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def phase(console: Console, what: str) -> Iterator[None]:
    """A step without a count (loading a model, building the SVD space): a spinner on a terminal,
    otherwise a line when it starts and one with its duration when it ends."""
    start = time.perf_counter()
    if console.is_terminal:
        with console.status(f"{what}..."):
            yield
        return
    console.print(f"{what}...", highlight=False)
    yield
    console.print(f"{what}: done in {time.perf_counter() - start:.1f} s", highlight=False)


class Steps:
    """Progress of counted work (iterations, chunks of prompts). `bar=False` is for work inside
    another live display (rich allows one at a time): silent on a terminal, lines elsewhere."""

    def __init__(self, console: Console, what: str, total: int, done: int = 0, bar: bool = True,
                 start: float | None = None) -> None:
        self.console, self.what, self.total, self.first = console, what, total, done
        self.start = time.perf_counter() if start is None else start
        self.bar: Progress | None = None
        self.silent = console.is_terminal and not bar
        if console.is_terminal and bar:
            self.bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console,
                                transient=what != "align")
            self.task = self.bar.add_task(what, total=total, completed=done, stats="")

    def __enter__(self) -> "Steps":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, done: int, stats: str = "") -> None:
        if self.bar:
            self.bar.update(self.task, completed=done, stats=stats)
            return
        if self.silent:
            return
        elapsed = time.perf_counter() - self.start
        rate = (done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - done) / rate) if rate > 0 else "?"
        parts = [f"{self.what} {done}/{self.total}", stats, f"elapsed {clock(elapsed)}", f"ETA {eta}"]
        self.console.print("  ".join(p for p in parts if p), highlight=False, soft_wrap=True)


class ChunkSteps:
    """Progress of an evaluation: once it has more than one chunk, a Steps line (or bar) per chunk,
    and inside a long chunk a line every `every` seconds with its rows finished and tokens per second
    (a chunk of long IFEval prompts can take minutes). Its clock starts with the evaluation, not at
    the first finished chunk: that line's elapsed time and ETA count the first chunk's own time."""

    def __init__(self, console: Console, what: str, bar: bool = True, every: float = 20.0) -> None:
        self.console, self.what, self.bar, self.steps, self.every = console, what, bar, None, every
        self.start = time.perf_counter()
        self.chunks_done, self.chunks, self.chunk_start, self.last_line = 0, 0, self.start, self.start

    def __call__(self, done: int, total: int) -> None:
        interrupts.check()
        self.chunks_done, self.chunks = done, total
        self.chunk_start = self.last_line = time.perf_counter()
        if total < 2 or done == 0:  # done == 0: the evaluation starts and says how many chunks it has
            return
        if self.steps is None:
            self.steps = Steps(self.console, self.what, total, bar=self.bar, start=self.start).__enter__()
        self.steps.update(done)

    def rows(self, finished: int, total: int, tokens: int) -> None:
        """Inside the running chunk (the engine calls this after every decode step)."""
        interrupts.check()  # a swallowed Ctrl-C stops a long evaluation within one decode step
        now = time.perf_counter()
        if now - self.last_line < self.every or (self.console.is_terminal and not self.bar):
            return
        self.last_line = now
        chunk = f"chunk {self.chunks_done + 1}/{self.chunks} " if self.chunks > 1 else ""
        rate = tokens / (now - self.chunk_start) if now > self.chunk_start else 0.0
        self.console.print(f"{self.what}: {chunk}{finished}/{total} rows finished  {tokens} tokens  "
                           f"{rate:.0f} tok/s  elapsed {clock(now - self.start)}", highlight=False, soft_wrap=True)

    def __enter__(self) -> "ChunkSteps":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.steps is not None:
            self.steps.__exit__(*exc)
