"""Cancelling a running job from the worker's side: the token the worker's watcher thread and
the job runner share. (Inside the model's process, ``registry.cancel`` is the other half.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mlx_fusion.errors import JobCancelled

if TYPE_CHECKING:
    from mlx_fusion.registry import Lease


class Cancellation:
    """The cancellation of one running job: the worker calls ``request`` when Tier 2 cancels it
    and ``enforce`` once the grace time has passed; the runner attaches the job's lease while the
    model runs it."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._lock = threading.Lock()
        self._lease: Lease | None = None

    @contextmanager
    def attached(self, lease: Lease) -> Iterator[None]:
        """Make ``lease`` the target of a cancellation while the block runs; ``JobCancelled``
        at once when one came first."""
        with self._lock:
            if self.requested.is_set():
                raise JobCancelled("the job was cancelled before its model ran it")
            self._lease = lease
        try:
            yield
        finally:
            with self._lock:
                self._lease = None

    def request(self) -> None:
        """Ask the running job to stop at its next check (``registry.cancel``)."""
        with self._lock:
            self.requested.set()
            if self._lease is not None:
                self._lease.cancel()

    def enforce(self) -> bool:
        """Kill the job's model process if the job is still running; whether it was."""
        with self._lock:
            if self._lease is None:
                return False
            self._lease.kill()
            return True
