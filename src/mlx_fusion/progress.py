"""Progress of long CLI work (model imports, loads, following a job) on stderr.

On a terminal a live line (rich) shows the current step, a count or a spinner and the elapsed
time; elsewhere (a pipe, a log file, CI) each step is one plain line and counts are printed at
every tenth, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO


class Reporter(Protocol):
    """What long work calls to report progress."""

    def step(self, message: str) -> None:
        """A milestone (always shown)."""

    def advance(self, done: int, total: int) -> None:
        """``done`` of ``total`` units of the current step."""

    def tick(self, detail: str) -> None:
        """Still working on the current step (a live line only)."""


class Silent:
    """A reporter that shows nothing (library calls)."""

    def step(self, message: str) -> None:
        pass

    def advance(self, done: int, total: int) -> None:
        pass

    def tick(self, detail: str) -> None:
        pass


class _Lines:
    def __init__(self, title: str, out: TextIO) -> None:
        self._title = title
        self._out = out
        self._began = time.monotonic()
        self._shown_tenth = -1

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self._began
        print(f"{self._title}: {text} [{elapsed:.1f} s]", file=self._out, flush=True)

    def step(self, message: str) -> None:
        self._shown_tenth = -1
        self._line(message)

    def advance(self, done: int, total: int) -> None:
        tenth = (10 * done) // total if total > 0 else 10
        if tenth > self._shown_tenth:
            self._shown_tenth = tenth
            self._line(f"{done}/{total}")

    def tick(self, detail: str) -> None:
        pass


class _Live(_Lines):
    def __init__(self, title: str, out: TextIO, status: Any) -> None:
        super().__init__(title, out)
        self._status = status
        self._current = ""

    def _update(self, text: str) -> None:
        elapsed = time.monotonic() - self._began
        self._status.update(f"{self._title}: {text} [{elapsed:.1f} s]")

    def step(self, message: str) -> None:
        self._current = message
        self._status.console.print(f"{self._title}: {message}")
        self._update(message)

    def advance(self, done: int, total: int) -> None:
        self._update(f"{self._current} {done}/{total}")

    def tick(self, detail: str) -> None:
        self._update(detail)


@contextmanager
def progress(title: str, out: TextIO | None = None) -> Iterator[Reporter]:
    """A reporter for the length of the block: live on a terminal, plain lines elsewhere."""
    stream = out or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        yield _Lines(title, stream)
        return
    from rich.console import Console

    console = Console(file=stream)
    with console.status(title) as status:
        yield _Live(title, stream, status)
