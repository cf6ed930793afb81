"""Each loaded model in a process of its own, driven over a pipe; or, for debugging, in this one.

The worker process never imports MLX. ``ModelProcess`` starts a child with ``spawn`` (never
``fork``: Metal and CUDA do not survive one) that imports the kind module by its dotted name,
loads the model, and answers requests until it is told to stop or its pipe reaches EOF::

    parent                                 child
    start()  -- spawn ------------------>  import kind module; load(spec)
             <-- ("ok", load report) ----  or ("error", {code, message}), then exit
    run(doc) -- ("run", doc) ----------->  parse_job(doc); kind.run(model, job)
             <-- ("ok", {result, metrics, memory}) | ("error", {code, message[, field]})
    stop()   -- ("stop", None) --------->  exit (then SIGTERM, then SIGKILL)

Killing the child is the only reliable way to give a model's memory back, and a crash in it fails
one job, not the worker.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import ModuleType
from typing import Any, Protocol

import structlog

from mlx_fusion import logs
from mlx_fusion.errors import (
    FusionError,
    InferenceError,
    JobTimeout,
    JobValidationError,
    ModelCrashed,
    ModelLoadError,
    OutOfMemory,
    error_from_dict,
)
from mlx_fusion.jobs.document import parse_job
from mlx_fusion.registry import cancel, multiplex
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.multiplex import Multiplexer, Request

OOM_MARKERS = (
    "out of memory",
    "unable to allocate",
    "[metal::malloc]",
    "insufficient memory",
    "bad_alloc",
    "cuda_error_out_of_memory",
    "cudaerrormemoryallocation",
)
"""Lower-case fragments of MLX / Metal / CUDA allocation failures."""

TERM_WAIT_S = 1.0
"""How long ``stop`` waits after SIGTERM before SIGKILL."""

ABORT_GRACE_S = 5.0
"""How long a batched job past its timeout waits for the model process to drop it before the
process, stuck, is killed."""

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MemoryReport:
    """Memory of the process holding a model, measured after a load or a job."""

    active_bytes: int
    """``mx.get_active_memory()``; 0 when the kind does not use MLX."""
    peak_bytes: int
    """``mx.get_peak_memory()`` since the start of the load or of the job."""
    rss_bytes: int
    """Resident set size of the process holding the model."""
    cache_bytes: int = 0
    """``mx.get_cache_memory()``: freed buffers MLX keeps for reuse; 0 without MLX."""


@dataclass(frozen=True)
class LoadReport:
    """What starting a model cost."""

    load_ms: float
    """Wall time of ``start``: spawn, imports and ``load(spec)``."""
    memory: MemoryReport
    device: dict[str, Any]
    """``mx.device_info()`` as JSON-able values; empty when the kind does not use MLX."""


class ModelHandle(Protocol):
    """A loaded model as the registry drives it, in a child process or in this one."""

    spec: ModelSpec

    def start(self, timeout_s: float) -> LoadReport: ...

    def run(
        self,
        job_document: dict[str, Any],
        timeout_s: float | None = None,
        request: Request | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], MemoryReport]: ...

    def stop(self, grace_s: float = 5.0) -> None: ...

    def cancel(self, request: Request | None = None) -> None:
        """Ask the job in flight (``request``'s, when several are) to stop at its next check
        (see ``registry.cancel``)."""

    def kill(self, request: Request | None = None) -> None:
        """End the job in flight by force, when the holder can (a model process can); with
        ``request``, only while that job still runs."""

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...


def error_reply(exc: BaseException, fallback: type[FusionError], context: str) -> dict[str, Any]:
    """The ``{code, message[, field]}`` reply for an exception raised by a load or a job.

    Allocation failures become ``out_of_memory`` even when a kind wrapped them; validation
    errors keep their code and field; other exceptions become ``fallback``.
    """
    if isinstance(exc, JobValidationError):
        return exc.to_dict()
    text = exc.message if isinstance(exc, FusionError) else f"{type(exc).__name__}: {exc}"
    if not text.startswith(context):
        text = f"{context}: {text}"
    if isinstance(exc, MemoryError) or any(m in text.lower() for m in OOM_MARKERS):
        return OutOfMemory(text).to_dict()
    if isinstance(exc, FusionError):
        return {**exc.to_dict(), "message": text}
    return fallback(text).to_dict()


def _memory_report() -> MemoryReport:
    import psutil

    mx = sys.modules.get("mlx.core")
    return MemoryReport(
        active_bytes=int(mx.get_active_memory()) if mx else 0,
        peak_bytes=int(mx.get_peak_memory()) if mx else 0,
        rss_bytes=int(psutil.Process().memory_info().rss),
        cache_bytes=int(mx.get_cache_memory()) if mx else 0,
    )


def _device_info() -> dict[str, Any]:
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return {}
    plain = (str, int, float, bool, type(None))
    return {str(k): v if isinstance(v, plain) else str(v) for k, v in mx.device_info().items()}


def _reset_peak() -> None:
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.reset_peak_memory()


def _load(spec: ModelSpec, kind_module: str) -> tuple[ModuleType, Any]:
    _reset_peak()
    kind = importlib.import_module(kind_module)
    return kind, kind.load(spec)


def _run(
    kind: ModuleType, model: Any, job_document: dict[str, Any], max_input_bytes: int
) -> tuple[dict[str, Any], dict[str, Any], MemoryReport]:
    _reset_peak()
    job = parse_job(job_document, max_input_bytes=max_input_bytes)
    result, metrics = kind.run(model, job)
    memory = _memory_report()
    log.info(
        "model_job_done",
        pid=os.getpid(),
        inference_ms=metrics.get("inference_ms"),
        active_bytes=memory.active_bytes,
        peak_bytes=memory.peak_bytes,
        cache_bytes=memory.cache_bytes,
    )
    return result, metrics, memory


def _log_context() -> dict[str, Any]:
    """The worker's log context of the job being sent (job_id, request_id, kind, worker)."""
    return {
        str(k): v
        for k, v in structlog.contextvars.get_contextvars().items()
        if isinstance(v, (str, int, float, bool, type(None)))
    }


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # returns when the parent's end of the spawn pipe closes: the parent died
        os._exit(0)


def _child_main(
    conn: Connection,
    spec_data: dict[str, Any],
    kind_module: str,
    max_input_bytes: int,
    cancel_flag: Any,
    log_config: dict[str, Any] | None = None,
    max_batch: int = 1,
) -> None:
    # Ctrl-C on the worker's terminal reaches this process group too; the parent stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cancel.install(cancel_flag)
    logs.configure_child(log_config or {})
    try:  # stdout belongs to the worker (its logs); whatever the model prints goes to stderr
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    sys.stdout = sys.stderr
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    context = f"model {spec_data.get('id')!r}"
    structlog.contextvars.bind_contextvars(model=spec_data.get("id"))
    try:
        kind, model = _load(ModelSpec.model_validate(spec_data), kind_module)
        engine_class = getattr(kind, "BatchEngine", None) if max_batch > 1 else None
        engine = engine_class(model, max_batch) if engine_class is not None else None
        reply: tuple[str, Any] = (
            "ok",
            {
                "memory": asdict(_memory_report()),
                "device": _device_info(),
                "batch": max_batch if engine is not None else 1,
            },
        )
    except Exception as e:
        conn.send(("error", error_reply(e, ModelLoadError, context)))
        return
    if engine is not None:
        conn.send(reply)
        multiplex.serve(
            conn,
            engine,
            max_input_bytes=max_input_bytes,
            context=context,
            memory=_memory_report,
            error_reply=error_reply,
        )
        return
    while True:
        try:
            conn.send(reply)
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message[0] != "run":
            return
        # the worker's log context for this job (job_id, request_id, kind, worker)
        job_context = message[2] if len(message) > 2 and isinstance(message[2], dict) else {}
        with structlog.contextvars.bound_contextvars(**job_context):
            try:
                result, metrics, memory = _run(kind, model, message[1], max_input_bytes)
                reply = ("ok", {"result": result, "metrics": metrics, "memory": asdict(memory)})
            except Exception as e:
                reply = ("error", error_reply(e, InferenceError, context))


class _Timeout(Exception):
    pass


class ModelProcess:
    """A model loaded in a child process: one request in flight at a time, or, for a kind
    with a batch engine and ``max_batch`` above one, up to that many (``registry.multiplex``)."""

    def __init__(
        self, spec: ModelSpec, kind_module: str, *, max_input_bytes: int, max_batch: int = 1
    ) -> None:
        self.spec = spec
        self.kind_module = kind_module
        self.max_input_bytes = max_input_bytes
        self.max_batch = max_batch
        self._mux: Multiplexer | None = None
        self._lock = threading.RLock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._pid: int | None = None
        self._exitcode: int | None = None
        self._dead = False
        self._cancel: Any = None

    @property
    def alive(self) -> bool:
        """True while the child is running and can take a job."""
        process = self._process
        return not self._dead and process is not None and process.is_alive()

    @property
    def pid(self) -> int | None:
        """The child's pid once started (kept after it exits, for logs)."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code once it has exited and been reaped (negative: a signal)."""
        return self._exitcode

    def start(self, timeout_s: float) -> LoadReport:
        """Spawn the child and load the model; ``ModelLoadError``, ``OutOfMemory`` or
        ``ModelCrashed`` on failure, after which the child is gone."""
        if self._process is not None or self._dead:
            raise RuntimeError(f"model process for {self.spec.id!r} was already started")
        began = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe()
        self._cancel = ctx.Event()
        process = ctx.Process(
            target=_child_main,
            args=(
                child_conn,
                self.spec.model_dump(mode="json"),
                self.kind_module,
                self.max_input_bytes,
                self._cancel,
                logs.child_config(),
                self.max_batch,
            ),
            name=f"mlx-fusion-model:{self.spec.id}",
            daemon=True,
        )
        with self._lock:
            self._process, self._conn = process, parent_conn
            try:
                process.start()
                self._pid = process.pid
                child_conn.close()
                status, payload = self._receive(timeout_s, during="load")
            except _Timeout:
                self._shut_down(kill=True)
                raise ModelLoadError(
                    f"model {self.spec.id!r}: load timed out after {timeout_s:g} s"
                ) from None
            except BaseException:
                self._shut_down(kill=True)
                raise
            if status != "ok":
                self._shut_down(kill=False)
                raise error_from_dict(payload)
            if payload.get("batch", 1) > 1:
                self._mux = Multiplexer(parent_conn, f"model-{self.spec.id}", self._death_joined)
        return LoadReport(
            load_ms=round((time.perf_counter() - began) * 1000, 3),
            memory=MemoryReport(**payload["memory"]),
            device=payload["device"],
        )

    @property
    def batching(self) -> bool:
        """True when several jobs may run at once in this process."""
        return self._mux is not None

    def run(
        self,
        job_document: dict[str, Any],
        timeout_s: float | None = None,
        request: Request | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], MemoryReport]:
        """Run one job document in the child: (result, metrics, memory after the job).

        A ``FusionError`` the job raised comes back as itself and the child lives on; a timeout
        (``JobTimeout``), a dead child (``ModelCrashed``) or any exception while waiting kills
        the child, and every later ``run`` raises ``ModelCrashed``. In a batching process a
        timeout or an exception while waiting ends only this job, unless the child does not
        drop it within ``ABORT_GRACE_S`` (stuck: it is killed).
        """
        if self._mux is not None:
            return self._run_batched(self._mux, job_document, timeout_s, request or Request())
        with self._lock:
            if not self.alive or self._conn is None:
                raise ModelCrashed(f"model {self.spec.id!r}: model process is not running")
            try:
                if self._cancel is not None:
                    self._cancel.clear()
                self._conn.send(("run", job_document, _log_context()))
                status, payload = self._receive(timeout_s, during="job")
            except _Timeout:
                self._shut_down(kill=True)
                raise JobTimeout(
                    f"model {self.spec.id!r}: job ran past {timeout_s:g} s; model process killed"
                ) from None
            except BaseException:
                self._shut_down(kill=True)
                raise
        if status != "ok":
            raise error_from_dict(payload)
        return payload["result"], payload["metrics"], MemoryReport(**payload["memory"])

    def _run_batched(
        self,
        mux: Multiplexer,
        job_document: dict[str, Any],
        timeout_s: float | None,
        request: Request,
    ) -> tuple[dict[str, Any], dict[str, Any], MemoryReport]:
        if not self.alive:
            raise ModelCrashed(f"model {self.spec.id!r}: model process is not running")
        slot = mux.submit(job_document, _log_context(), request)
        assert request.tag is not None
        if request.cancelled:  # cancelled while it was being sent
            mux.cancel(request.tag, timed_out=False)
        try:
            if not slot.event.wait(timeout_s):
                mux.cancel(request.tag, timed_out=True)
                if not slot.event.wait(ABORT_GRACE_S):
                    self._shut_down(kill=True)
                    raise JobTimeout(
                        f"model {self.spec.id!r}: job ran past {timeout_s:g} s and the model "
                        "process did not drop it; model process killed"
                    )
        except BaseException:  # the job's own timeout signal, an interrupt: end this job only
            mux.cancel(request.tag, timed_out=True)
            if not slot.event.wait(ABORT_GRACE_S):
                self._shut_down(kill=True)
            raise
        finally:
            request.done = True
        assert slot.reply is not None
        status, payload = slot.reply
        if status != "ok":
            raise error_from_dict(payload)
        return payload["result"], payload["metrics"], MemoryReport(**payload["memory"])

    def cancel(self, request: Request | None = None) -> None:
        """The job in flight (``request``'s, in a batching process) stops at its next check."""
        if self._mux is not None:
            if request is not None:
                request.cancelled = True
                if request.tag is not None and not request.done:
                    self._mux.cancel(request.tag, timed_out=False)
            return
        if self._cancel is not None:
            self._cancel.set()

    def kill(self, request: Request | None = None) -> None:
        """SIGKILL the child now: the job in flight ends (``ModelCrashed``), the model unloads.
        In a batching process, only while ``request`` (when given) still runs: every job of the
        batch ends with it."""
        if self._mux is not None and request is not None and request.done:
            return
        process = self._process
        if process is not None and process.exitcode is None:
            process.kill()

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask the child to exit, wait ``grace_s``, SIGTERM, wait ``TERM_WAIT_S``, SIGKILL; reap it.

        Idempotent, and safe when the child already died. A busy child gets no stop request
        (its pipe belongs to the job in flight) and is terminated after ``grace_s``.
        """
        process = self._process
        if process is None:
            return
        if self._mux is not None:
            if process.is_alive():
                self._mux.stop()
        elif process.is_alive() and self._lock.acquire(blocking=False):
            try:
                if self._conn is not None:
                    self._conn.send(("stop", None))
            except (OSError, ValueError):
                pass
            finally:
                self._lock.release()
        process.join(grace_s)
        if process.exitcode is None:
            process.terminate()
            process.join(TERM_WAIT_S)
        if process.exitcode is None:
            process.kill()
            process.join(5.0)
        if process.exitcode is not None:
            self._exitcode = process.exitcode
        with self._lock:  # a run in flight sees the child die and shuts down first
            self._shut_down(kill=True)

    def _receive(self, timeout_s: float | None, *, during: str) -> tuple[str, Any]:
        assert self._process is not None and self._conn is not None
        try:
            ready = wait([self._conn, self._process.sentinel], timeout_s)
            if not ready:
                raise _Timeout
            if self._conn in ready:
                status, payload = self._conn.recv()
                return str(status), payload
        except (EOFError, OSError):
            pass
        self._process.join(5.0)
        raise ModelCrashed(f"model {self.spec.id!r}: {self._death()} during the {during}")

    def _death_joined(self) -> str:
        process = self._process
        if process is not None:
            process.join(1.0)
        return f"model {self.spec.id!r}: {self._death()}"

    def _death(self) -> str:
        code = None if self._process is None else self._process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return f"model process {self._pid} {how}"

    def _shut_down(self, *, kill: bool) -> None:
        self._dead = True
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None and process.pid is not None:
            if kill and process.exitcode is None:
                process.kill()
            process.join(5.0)
            if process.exitcode is not None:  # another thread may have reaped it first
                self._exitcode = process.exitcode
        if conn is not None:
            conn.close()


class InProcessModel:
    """A model loaded in the calling process (debugging and tests): timeouts are not enforced
    here, and a crash takes the caller with it."""

    def __init__(self, spec: ModelSpec, kind_module: str, *, max_input_bytes: int) -> None:
        self.spec = spec
        self.kind_module = kind_module
        self.max_input_bytes = max_input_bytes
        self._lock = threading.Lock()
        self._kind: ModuleType | None = None
        self._model: Any = None

    @property
    def alive(self) -> bool:
        """True while the model is loaded."""
        return self._kind is not None

    @property
    def pid(self) -> int | None:
        """This process's pid."""
        return os.getpid()

    def start(self, timeout_s: float) -> LoadReport:
        """Load the model here (``timeout_s`` is not enforced in-process)."""
        began = time.perf_counter()
        try:
            self._kind, self._model = _load(self.spec, self.kind_module)
        except Exception as e:
            context = f"model {self.spec.id!r}"
            raise error_from_dict(error_reply(e, ModelLoadError, context)) from e
        return LoadReport(
            load_ms=round((time.perf_counter() - began) * 1000, 3),
            memory=_memory_report(),
            device=_device_info(),
        )

    def run(
        self,
        job_document: dict[str, Any],
        timeout_s: float | None = None,
        request: Request | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], MemoryReport]:
        """Run one job document here (``timeout_s`` is not enforced in-process, and nothing is
        streamed)."""
        with self._lock:
            if self._kind is None:
                raise ModelCrashed(f"model {self.spec.id!r}: model is not loaded")
            cancel.flag().clear()
            try:
                return _run(self._kind, self._model, job_document, self.max_input_bytes)
            except Exception as e:
                context = f"model {self.spec.id!r}"
                raise error_from_dict(error_reply(e, InferenceError, context)) from e

    def cancel(self, request: Request | None = None) -> None:
        """Set this process's cancel flag: the job in flight stops at its next check."""
        cancel.flag().set()

    def kill(self, request: Request | None = None) -> None:
        """Nothing: a job in this process can only stop at a check."""

    def stop(self, grace_s: float = 5.0) -> None:
        """Drop the model (after the kind's ``unload(model)``, which clears library-level caches,
        when it has one) and give MLX's cached buffers back."""
        with self._lock:
            unload = getattr(self._kind, "unload", None)
            if unload is not None and self._model is not None:
                unload(self._model)
            self._kind = self._model = None
        mx = sys.modules.get("mlx.core")
        if mx is not None:
            mx.clear_cache()
