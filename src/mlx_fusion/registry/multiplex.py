"""Several jobs in flight on one model process: both halves of the batched pipe protocol.

A model whose kind has a ``BatchEngine`` (see ``registry.engine``) and a batch limit above one
serves its pipe this way once loaded; every message names its job by a tag::

    parent (any number of job threads)               child (one loop)
    ("run", tag, doc, log context, stream) ------->  parse; engine.submit
    ("cancel", tag, timed_out) ------------------->  engine.cancel
    ("stop",) ------------------------------------>  exit
            <--- ("token", tag, {text, produced_at})  a streamed piece
            <--- ("ok", tag, {result, metrics, memory}) | ("error", tag, {code, message})

In the child, ``serve`` reads every waiting message between engine steps and blocks on the pipe
only while the engine is idle. In the parent, one reader thread hands each reply to the thread
waiting for its tag (``Multiplexer``); when the child dies, every waiting job gets
``ModelCrashed``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import structlog

from mlx_fusion.errors import InferenceError, ModelCrashed
from mlx_fusion.jobs.document import parse_job
from mlx_fusion.registry.engine import BatchEngine

log = structlog.get_logger(__name__)

TokenCallback = Callable[[dict[str, Any]], Any]


@dataclass
class Request:
    """One job's run on a model handle, and how to reach it while it runs: its streamed pieces
    go to ``on_token``; a batching handle sets ``tag``, and ``done`` once the reply came."""

    stream: bool = False
    on_token: TokenCallback | None = None
    tag: int | None = None
    done: bool = False
    cancelled: bool = False
    """Set by a cancel that came before the job was sent (it is passed on once sent)."""


# ----- the child's side ------------------------------------------------------------------------


def serve(
    conn: Connection,
    engine: BatchEngine,
    *,
    max_input_bytes: int,
    context: str,
    memory: Callable[[], Any],
    error_reply: Callable[[BaseException, type, str], dict[str, Any]],
) -> None:
    """Answer tagged requests with ``engine`` until told to stop or the pipe closes. An engine
    step that raises fails every job in it, and the process exits (its state is unknown)."""
    contexts: dict[int, dict[str, Any]] = {}

    def send(message: tuple[Any, ...]) -> None:
        conn.send(message)

    while True:
        wait_s: float | None = 0 if engine.busy else None
        try:
            while conn.poll(wait_s):
                message = conn.recv()
                wait_s = 0
                if message[0] == "run":
                    _, tag, document, job_context, stream = message
                    contexts[tag] = job_context if isinstance(job_context, dict) else {}
                    try:
                        job = parse_job(document, max_input_bytes=max_input_bytes)
                        engine.submit(tag, job, bool(stream))
                    except Exception as e:
                        contexts.pop(tag, None)
                        send(("error", tag, error_reply(e, InferenceError, context)))
                elif message[0] == "cancel":
                    engine.cancel(message[1], timed_out=bool(message[2]))
                else:
                    return
            if not engine.busy:
                continue
            try:
                events = engine.step()
            except Exception as e:
                reply = error_reply(e, InferenceError, context)
                log.error("batch_step_failed", jobs=len(contexts), error=reply["message"])
                for tag in contexts:
                    send(("error", tag, reply))
                return
            for event in events:
                if event.type == "token":
                    send(("token", event.tag, event.payload))
                    continue
                job_context = contexts.pop(event.tag, {})
                if event.type == "done":
                    result, metrics = event.payload
                    report = memory()
                    with structlog.contextvars.bound_contextvars(**job_context):
                        log.info(
                            "model_job_done",
                            pid=os.getpid(),
                            inference_ms=metrics.get("inference_ms"),
                            batch_size=metrics.get("batch_size"),
                            active_bytes=report.active_bytes,
                        )
                    send(
                        (
                            "ok",
                            event.tag,
                            {"result": result, "metrics": metrics, "memory": asdict(report)},
                        )
                    )
                else:
                    send(("error", event.tag, error_reply(event.payload, InferenceError, context)))
        except (EOFError, OSError, BrokenPipeError):
            return  # the parent is gone


# ----- the parent's side -----------------------------------------------------------------------


@dataclass
class _Slot:
    on_token: TokenCallback | None
    event: threading.Event = field(default_factory=threading.Event)
    reply: tuple[str, Any] | None = None


class Multiplexer:
    """The parent's end of a batched model process: ``submit`` from any thread, one reader
    thread delivering replies by tag. ``death`` describes the child once the pipe closed."""

    def __init__(self, conn: Connection, name: str, death: Callable[[], str]) -> None:
        self._conn = conn
        self._death = death
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._tags = itertools.count(1)
        self._closed: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    @property
    def in_flight(self) -> int:
        """Jobs sent and not answered."""
        with self._lock:
            return len(self._slots)

    def submit(
        self, document: dict[str, Any], job_context: dict[str, Any], request: Request
    ) -> _Slot:
        """Send one job; the returned slot's event is set when its reply came."""
        slot = _Slot(on_token=request.on_token)
        with self._lock:
            if self._closed is not None:
                raise ModelCrashed(self._closed)
            tag = next(self._tags)
            request.tag = tag
            self._slots[tag] = slot
            try:
                self._conn.send(("run", tag, document, job_context, request.stream))
            except (OSError, ValueError) as e:
                self._slots.pop(tag, None)
                raise ModelCrashed(f"cannot send the job to the model process: {e}") from e
        return slot

    def cancel(self, tag: int, *, timed_out: bool) -> None:
        """Ask the child to end job ``tag`` at its next step."""
        with self._lock:
            if tag in self._slots and self._closed is None:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(("cancel", tag, timed_out))

    def stop(self) -> bool:
        """Ask the child to exit; False when the pipe was already closed."""
        with self._lock:
            if self._closed is not None:
                return False
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                return False
            return True

    def wait_closed(self, timeout_s: float) -> None:
        """Wait for the reader to see the pipe close (after the child died)."""
        self._reader.join(timeout_s)

    def _read(self) -> None:
        while True:
            try:
                kind, tag, payload = self._conn.recv()
            except (EOFError, OSError, ValueError, TypeError):
                break
            if kind == "token":
                slot = self._slots.get(tag)
                if slot is not None and slot.on_token is not None:
                    try:
                        slot.on_token(payload)
                    except Exception as e:  # a stream that cannot be written never fails a job
                        log.warning("token_callback_failed", error=f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                slot = self._slots.pop(tag, None)
            if slot is not None:
                slot.reply = (str(kind), payload)
                slot.event.set()
        time.sleep(0.05)  # let the process be reaped, so the message names its exit code
        with self._lock:
            self._closed = self._death()
            slots, self._slots = self._slots, {}
        crashed = ModelCrashed(f"{self._closed} during the job").to_dict()
        for slot in slots.values():
            slot.reply = ("error", crashed)
            slot.event.set()
