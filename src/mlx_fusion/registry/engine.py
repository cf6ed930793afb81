"""Batch engines: how a model process runs several jobs of one model at once.

A kind module that can batch exports ``BatchEngine``, a class built once per loaded model as
``BatchEngine(model, max_batch)``. The model process then keeps reading its pipe while jobs run,
hands every job to ``submit``, and calls ``step`` whenever the engine is ``busy``; each step
returns what happened since the last one, as ``Event`` objects:

- ``Event(tag, "token", {...})``: a streamed piece of a job's output (only for jobs that asked
  for a stream), with ``produced_at`` (``time.time()`` when the model produced it);
- ``Event(tag, "done", (result, metrics))``: the job finished;
- ``Event(tag, "error", exception)``: the job failed; the other jobs go on.

``cancel(tag)`` ends one job at the engine's next step (an ``error`` event with
``JobCancelled`` or, for ``timed_out=True``, ``JobTimeout``). Nothing a single job does may end
the others: an engine isolates per-job failures itself.

Kinds without ``BatchEngine`` run one job at a time, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mlx_fusion.jobs.document import Job

EventType = Literal["token", "done", "error"]


@dataclass(frozen=True)
class Event:
    """Something that happened to one job of a batch (see the module docstring)."""

    tag: int
    type: EventType
    payload: Any


class BatchEngine(Protocol):
    """What a kind's ``BatchEngine`` class provides (see the module docstring)."""

    def __init__(self, model: Any, max_batch: int) -> None: ...

    def submit(self, tag: int, job: Job, stream: bool = False) -> None:
        """Take a job; may raise a ``FusionError`` for a job it refuses at once (the job fails,
        nothing else changes). ``stream``: emit ``token`` events for it."""

    def cancel(self, tag: int, *, timed_out: bool = False) -> None:
        """End the job ``tag`` at the next step (nothing when it already ended)."""

    @property
    def busy(self) -> bool:
        """True while some submitted job has not ended yet."""

    def step(self) -> list[Event]:
        """Advance every running job by one step; what happened."""
