"""Cooperative cancellation inside the process that runs a model.

The process holding a model has one cancel flag (a ``multiprocessing`` event shared with the
worker for a model process, a ``threading`` event in-process). The worker sets it when Tier 2
cancels the running job; kinds call ``check()`` between tokens (language and vision models) or
denoising steps (image models), which raises ``JobCancelled`` and ends the job at once. A kind
stuck in native code never reaches ``check()``: the worker kills its process after a grace time
instead.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from mlx_fusion.errors import JobCancelled


class Flag(Protocol):
    """What ``threading.Event`` and ``multiprocessing.Event`` have in common here."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...

    def clear(self) -> None: ...


_flag: Flag = threading.Event()


def install(flag: Any) -> None:
    """Use ``flag`` as this process's cancel flag (a model process does this at start)."""
    global _flag
    _flag = flag


def flag() -> Flag:
    """This process's cancel flag."""
    return _flag


def check() -> None:
    """Raise ``JobCancelled`` when the running job was cancelled."""
    if _flag.is_set():
        raise JobCancelled("the job was cancelled while running")
