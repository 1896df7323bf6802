"""Progress of every long step: a bar on a terminal, a plain line now and then everywhere else.

A search or an evaluation can run for an hour. Where stderr is a terminal, a tqdm bar shows it;
where it is a log file, CI or ``nohup`` (no terminal), a bar would be noise, but silence is worse:
there, a step that has run :data:`LINE_SECONDS` writes one line (what it does, how far, the time
spent and left) and one more every :data:`LINE_SECONDS`. A step shorter than that writes nothing,
so a run that fails at once still ends in its one-line error. :func:`set_quiet` (``--quiet``)
turns both off.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

LINE_SECONDS = 10.0
"""Seconds between two progress lines where stderr is not a terminal."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """No bars and no lines (``layerprune --quiet``): errors and results only."""
    global _quiet
    _quiet = quiet


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """``what`` advancing through ``total`` ``unit`` (a plural: ``"batches"``; ``total`` ``None``: unknown;
    ``unit`` ``None``: only the time is shown), ``done`` of them already (a resumed run). :meth:`update` counts, :meth:`note` sets what the line ends with (a loss, the best
    so far); use it as a context manager, or :func:`progress` over an iterable."""

    def __init__(self, what: str, total: int | None = None, *, unit: str | None = "steps", done: int = 0,
                 shown: bool = True) -> None:
        self.what, self.total, self.unit, self.done = what, total, unit, done
        self.began = self.last_line = time.monotonic()
        self.started_at = done
        self.text = ""
        self.bar = None
        self.lines = False
        if shown and not _quiet:
            if sys.stderr.isatty():
                self.bar = tqdm(total=total, initial=done, desc=what, unit=unit, leave=False, file=sys.stderr,
                                dynamic_ncols=True)
            else:
                self.lines = True

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.lines and time.monotonic() - self.last_line >= LINE_SECONDS:
            self.write_line()

    def note(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def write_line(self) -> None:
        elapsed = time.monotonic() - self.began
        far = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        line = f"{self.what}: " + (f"{far} {self.unit}, " if self.unit else "") + f"{_clock(elapsed)} elapsed"
        ran = self.done - self.started_at
        if self.total is not None and ran > 0:
            line += f", about {_clock(elapsed / ran * (self.total - self.done))} left"
        print(line + (f" ({self.text})" if self.text else ""), file=sys.stderr, flush=True)
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[T], what: str, *, total: int | None = None, unit: str = "steps",
             shown: bool = True) -> Iterator[T]:
    """The items of ``iterable``, reporting as :class:`Progress` (``total``: its length where it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(what, total, unit=unit, shown=shown) as tracker:
        for item in iterable:
            yield item
            tracker.update()
