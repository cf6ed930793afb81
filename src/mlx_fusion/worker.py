"""The GPU worker: an RQ ``SimpleWorker`` that owns every RQ internal mlx-fusion touches.

What stock SimpleWorker lacks, added here:

- **Only the whitelisted entry point runs.** ``FusionJob`` refuses any other function, an
  instance method, callbacks, and RQ's own webhooks; a refused or undecodable job is recorded as
  failed and the worker goes on.
- **Heartbeats while a job runs.** Stock SimpleWorker sends none, so another worker's maintenance
  declares a long job abandoned; a thread here refreshes the worker, the job and its execution in
  the started registry every ``heartbeat_interval_s``, and the execution expires only after
  ``HEARTBEAT_GRACE_INTERVALS`` missed beats (so a dead worker's job is noticed quickly).
- **Finite timeouts**, capped at ``job_timeout_max_s``, raising ``JobTimeout`` into the job.
- **Unique worker names** (``host.pid.random``) and the JSON serializer, always.
- **No fork, no scheduler**: the job runs in this process; ``with_scheduler`` is ignored.
- **Cancelling a running job**: the heartbeat thread also watches the job's cancel key and
  stops the job through its model process (``cancellation``), killing it after a grace time.
- **Lost jobs recovered**: between jobs and when idle, ``recovery`` requeues (or fails with
  ``worker_lost``) jobs whose worker died, and re-enqueues queued records Redis lost.
- **Queue entries RQ could not have made** (hostile ids) are dropped instead of stopping the
  worker.
- **Webhooks off the GPU path**: a finished job's pending delivery is written with its final
  status, then its first attempt is queued for the webhook worker; nothing here sends HTTP.

Run it as ``mlx-fusion worker`` or as plain
``rq worker -w mlx_fusion.worker.FusionWorker -S rq.serializers.JSONSerializer fusion:high
fusion:default fusion:low``.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import UNEVALUATED, Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.utils import current_timestamp, decode_redis_hash
from rq.worker import SimpleWorker

from mlx_fusion import defaults
from mlx_fusion.cancellation import Cancellation
from mlx_fusion.config import Settings
from mlx_fusion.errors import FunctionNotAllowed, FusionError, JobTimeout, JobValidationError
from mlx_fusion.jobs.document import safe_fields
from mlx_fusion.jobs.store import utcnow
from mlx_fusion.metrics import (
    MetricsBase,
    MetricsServer,
    WorkerMetrics,
    queue_gauges,
    registry_gauges,
)
from mlx_fusion.scheduling import DEFAULT_LOAD_S, Scheduler

if TYPE_CHECKING:  # the webhook worker imports this module and must not load the registry
    from mlx_fusion.runner import JobRunner

log = structlog.get_logger(__name__)

_CURRENT: contextvars.ContextVar[
    tuple[JobRunner, FusionWorker, Job, Cancellation, float | None] | None
] = contextvars.ContextVar("mlx_fusion_current_job", default=None)


def run_job(document: Any) -> dict[str, Any]:
    """The one RQ job function mlx-fusion runs (``mlx_fusion.worker.run_job``).

    Producers enqueue it with the job document as its only argument; it runs only inside a
    ``FusionWorker``, which supplies the store and the registry.
    """
    current = _CURRENT.get()
    if current is None:
        raise RuntimeError("mlx_fusion.worker.run_job runs only inside a FusionWorker")
    runner, worker, job, cancellation, deadline = current
    return runner.process(
        document,
        job.id,
        worker=worker.name,
        enqueued_at=job.enqueued_at,
        cancellation=cancellation,
        deadline=deadline,
    )


def unique_worker_name() -> str:
    """``host.pid.random``: unique even for two workers in one process."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


class JobTimeoutSignal(JobTimeout, JobTimeoutException):
    """A job timeout: our code ``timeout`` for the job document, RQ's type for RQ."""


class FusionDeathPenalty(UnixSignalDeathPenalty):
    """RQ's SIGALRM timeout, raising ``JobTimeoutSignal`` into the running job."""

    def __init__(self, timeout: int, exception: Any = None, **kwargs: Any) -> None:
        super().__init__(timeout, JobTimeoutSignal, **kwargs)  # type: ignore[no-untyped-call]


_MALFORMED_PAYLOAD = "<malformed>"

STREAM_SOCKET_TIMEOUT_S = 2.0
"""Longest a token-stream write waits for Redis before that stream is given up."""


class WhitelistedJob(Job):
    """An RQ job that can only ever run ``allowed_function(*args)`` with ``len(arg_types)``
    positional arguments of those types: no other function, no instance, no callbacks, no RQ
    webhooks. A hash that cannot be read is kept as a job that fails with a precise error."""

    allowed_function: str = defaults.JOB_FUNCTION
    arg_types: tuple[type, ...] = (object,)
    args_description = "the job document as its only argument"
    _malformed: str | None = None

    @classmethod
    def fetch(cls, id: str, connection: Any = None, serializer: Any = None) -> Job:
        # A producer may push any string onto a queue; RQ raises ValueError for an id it would
        # not have made, out of dequeue, which stops the worker. Such an entry names no job.
        try:
            return super().fetch(id, connection=connection, serializer=serializer)
        except (ValueError, TypeError) as e:
            log.error("rq_job_id_refused", rq_job_id=repr(id)[:120], error=str(e))
            raise NoSuchJobError(f"job id {id!r} is not valid: {e}") from e

    def restore(self, raw_data: Any) -> Any:
        # A hash a producer wrote by hand may be broken; RQ would raise out of dequeue and stop the
        # worker. Keep what can be read and let the job fail with a precise error instead.
        try:
            return super().restore(raw_data)
        except NoSuchJobError as e:
            if not raw_data:
                raise
            self._malformed = f"RQ job hash is malformed: {e}"
        except Exception as e:
            self._malformed = f"RQ job hash is malformed: {type(e).__name__}: {e}"
        obj = decode_redis_hash(raw_data)
        self.origin = obj.get("origin", b"").decode(errors="replace")
        if self._data is UNEVALUATED:  # RQ cannot save a job without a payload
            self.data = self.serializer.dumps((_MALFORMED_PAYLOAD, None, (), {}))
        return None

    @property  # type: ignore[misc]
    def func_name(self) -> Any:
        # RQ reads it for logs before the job runs; an undecodable payload must reach _execute
        try:
            return super().func_name
        except DeserializationError:
            return "<undecodable>"

    def refusal(self) -> FusionError | None:
        """Why this job must not run, or None."""
        if self._malformed:
            return JobValidationError(self._malformed)
        try:
            self._deserialize_data()  # type: ignore[no-untyped-call]
        except DeserializationError as e:
            return JobValidationError(
                f"RQ payload is not the JSON list [function, null, [arguments], {{}}]: "
                f"{e.__cause__ or e}"
            )
        func_name, instance = self._func_name, self._instance
        args: Any = self._args
        kwargs: Any = self._kwargs
        if func_name != self.allowed_function:
            return FunctionNotAllowed(
                f"RQ job names function {func_name!r}; only {self.allowed_function!r} runs here"
            )
        names = (
            self._success_callback_name,
            self._failure_callback_name,
            self._stopped_callback_name,
        )
        if instance is not None or any(names):
            return FunctionNotAllowed("RQ job instances and callbacks are not allowed")
        if (
            not isinstance(args, (list, tuple))
            or len(args) != len(self.arg_types)
            or kwargs
            or not all(isinstance(a, t) for a, t in zip(args, self.arg_types, strict=True))
        ):
            return JobValidationError(f"RQ payload must carry {self.args_description}")
        return None

    def arguments(self) -> list[Any] | None:
        """The job's positional arguments, or None if they cannot be read."""
        if self._malformed:
            return None
        try:
            args = self.args
        except DeserializationError:
            return None
        return list(args) if isinstance(args, (list, tuple)) else None

    # Callbacks and RQ's webhooks would run producer-named code or reach producer-named URLs.
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None


class FusionJob(WhitelistedJob):
    """An RQ job that can only ever run ``run_job(document)``."""

    def document(self) -> Any:
        """The job document (the first argument), or None if it cannot be read."""
        args = self.arguments()
        return args[0] if args else None

    def _execute(self) -> Any:
        current = _CURRENT.get()
        problem = self.refusal()
        if problem is not None:
            if current is not None:
                current[0].reject(self.id, self.document(), problem)
            raise problem
        return run_job(self.document())


class _Heartbeat:
    """A thread that keeps a running job alive in Redis (``beat``: by default the worker's
    ``maintain_heartbeats``) and watches for its cancellation: every ``CANCEL_POLL_S`` it looks
    for the job's cancel key; once it is there the job is asked to stop, and killed with its
    model process if it still runs ``cancel_grace_s`` later."""

    def __init__(
        self,
        worker: FusionWorker,
        job: Job,
        cancellation: Cancellation,
        beat: Callable[[], Any] | None = None,
    ) -> None:
        self._worker = worker
        self._job = job
        self._cancellation = cancellation
        self._beat_once = beat or self._worker_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fusion-heartbeat", daemon=True)

    def _beat(self) -> None:
        settings = self._worker.settings
        interval = settings.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        cancelled_at: float | None = None
        while not self._stop.wait(min(interval, defaults.CANCEL_POLL_S)):
            now = time.monotonic()
            try:
                if cancelled_at is None and self._cancel_requested():
                    cancelled_at = now
                    log.info("job_cancel_requested", job_id=self._job.id)
                    self._cancellation.request()
                elif cancelled_at is not None and now - cancelled_at >= settings.cancel_grace_s:
                    if self._cancellation.enforce():
                        log.warning("job_cancel_enforced", job_id=self._job.id)
                    cancelled_at = float("inf")  # once
                if now >= next_beat:
                    next_beat = now + interval
                    self._beat_once()
            except Exception as e:  # a missed beat must never kill the job
                log.warning("heartbeat_failed", job_id=self._job.id, error=str(e))

    def _worker_beat(self) -> None:
        if self._worker.execution is not None:
            self._worker.maintain_heartbeats(self._job)

    def _cancel_requested(self) -> bool:
        key = self._worker.settings.cancel_key(self._job.id)
        return bool(self._worker.connection.exists(key))

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class MonitoredWorker(SimpleWorker):
    """What every mlx-fusion worker adds for operators: heartbeats that count only once they
    reached Redis, ``health()`` from them, and ``/metrics`` + ``/healthz`` served on
    ``metrics_port`` while it works. Subclasses set ``settings`` and ``metrics``."""

    settings: Settings
    metrics: MetricsBase
    serves_metrics = True
    """False in a pool's workers: the pool's parent serves the metrics of all of them."""
    _last_beat_ok: float = 0.0
    _running_job: str | None = None

    _registered = False

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[no-untyped-call]
        self._registered = True

    def register_death(self) -> None:
        self._registered = False
        super().register_death()  # type: ignore[no-untyped-call]

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        if pipeline is None:  # sent (a pipeline's beat counts once maintain_heartbeats ran it)
            self._stay_registered()
            self._beat_ok()

    def _stay_registered(self) -> None:
        # A Redis that lost its data (restarted without persistence, flushed) forgets the
        # worker, and RQ's heartbeat does not bring it back: status, health and other workers'
        # recovery would take it for dead. Register again.
        if self._registered and not self.connection.sismember(self.redis_workers_keys, self.key):
            log.warning("worker_registered_again", reason="Redis lost the worker's registration")
            self.connection.delete(self.key)
            super().register_birth()  # type: ignore[no-untyped-call]

    def maintain_heartbeats(self, job: Job) -> None:
        super().maintain_heartbeats(job)
        self._beat_ok()

    def _beat_ok(self) -> None:
        self._last_beat_ok = time.monotonic()
        self.metrics.heartbeat()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details): healthy while the last heartbeat that reached Redis is at most
        ``health_max_age_s`` old (default: the worker TTL). Reads no Redis."""
        age = time.monotonic() - self._last_beat_ok if self._last_beat_ok else None
        max_age = self.settings.health_max_age_s or float(self.worker_ttl)
        details = {
            "worker": self.name,
            "state": getattr(self, "_state", None),
            "current_job": self._running_job,
            "heartbeat_age_s": None if age is None else round(age, 3),
            "max_age_s": max_age,
        }
        return age is not None and age <= max_age, details

    @contextmanager
    def serving_metrics(self) -> Iterator[MetricsServer | None]:
        """Serve ``/metrics`` and ``/healthz`` for the length of the block (if a port is set)."""
        if self.settings.metrics_port is None or not self.serves_metrics:
            yield None
            return
        server = MetricsServer(
            self.metrics.registry,
            self.health,
            self.settings.metrics_host,
            self.settings.metrics_port,
        ).start()
        try:
            yield server
        finally:
            server.stop()


class FusionWorker(MonitoredWorker):
    """The mlx-fusion GPU worker (see the module docstring)."""

    death_penalty_class = FusionDeathPenalty
    job_class = FusionJob
    metrics: WorkerMetrics
    _streams_redis: Any = None

    def __init__(
        self,
        queues: Sequence[str | Queue] | str | Queue | None = None,
        *args: Any,
        settings: Settings | None = None,
        runner: JobRunner | None = None,
        **kwargs: Any,
    ) -> None:
        from mlx_fusion.services import build_runner

        self.settings = settings or Settings()
        names = queue_names_of(queues) or self.settings.queue_names()
        name = self.settings.worker_name or unique_worker_name()
        kwargs = worker_options(self.settings, kwargs, FusionJob, name)
        kwargs.setdefault("default_result_ttl", self.settings.result_ttl_s)
        # maintenance (registry cleanup, lost-job recovery) runs between jobs, and an idle worker
        # wakes from the queue every worker_ttl - 15 s for it
        kwargs.setdefault("maintenance_interval", self.settings.maintenance_interval_s("gpu"))
        kwargs.setdefault("worker_ttl", self.settings.worker_ttl_s("gpu"))
        kwargs.setdefault(
            "job_monitoring_interval", max(1, int(self.settings.heartbeat_interval_s))
        )
        super().__init__(names, *args, **kwargs)
        self.runner = runner or build_runner(self.settings)
        if self.runner.notify is None:
            from mlx_fusion.webhooks.outbox import Outbox

            outbox = Outbox(self.settings, self.runner.store, self.connection)
            self.runner.notify = outbox.notify
        self.runner.mark_spooled = self._mark_spooled
        if self.runner.streams is None:
            self.runner.streams = self._job_stream
        from mlx_fusion.recovery import JobRecovery

        self.recovery = JobRecovery(
            self.settings, self.runner.store, self.connection, notify=self.runner.notify
        )
        self.metrics = self._build_metrics()
        self.model_scheduler = self._build_scheduler()

    def _job_stream(self, job: Any, model_id: str) -> Any:
        from mlx_fusion.streaming import JobStream, writer_for_job

        writer = writer_for_job(
            self._stream_connection(), self.settings.queue_prefix, job, model_id
        )
        return None if writer is None else JobStream(writer, job)

    def _stream_connection(self) -> Any:
        """A Redis client for token streams that gives up at once: a stream write happens on
        the thread that delivers every batched job's replies, which must never wait out a Redis
        outage (the job's record is the source of truth; its stream is best effort)."""
        if self._streams_redis is None:
            from redis import ConnectionPool, Redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            pool = self.connection.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": STREAM_SOCKET_TIMEOUT_S}
            kwargs["retry"] = Retry(NoBackoff(), 0)
            self._streams_redis = Redis(
                connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs)
            )
        return self._streams_redis

    def _build_scheduler(self) -> Scheduler:
        registry = self.runner.registry

        def resolve(name: str) -> str | None:
            try:
                return registry.catalog.resolve(name).id
            except FusionError:
                return None

        scheduler = Scheduler(
            self.connection,
            lookahead=self.settings.schedule_lookahead,
            max_wait_s=self.settings.schedule_max_wait_s,
            resolve=resolve,
            loaded=lambda: set(registry.loaded()),
            load_s=lambda model: registry.load_seconds(model, DEFAULT_LOAD_S),
        )
        registry.waiting_models = lambda: scheduler.waiting_models
        return scheduler

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        try:  # put the job of a loaded model first (see ``scheduling``); then RQ's dequeue
            self.model_scheduler.prepare([q.key for q in self._ordered_queues], time.time())
        except Exception as e:  # a scheduling miss costs a model load, never the worker
            log.warning("schedule_failed", error=f"{type(e).__name__}: {e}")
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def _build_metrics(self) -> WorkerMetrics:
        from mlx_fusion.inspect import queue_status

        metrics = WorkerMetrics(self.name)
        self.runner.observe = metrics.job_finished
        self.runner.registry.events = metrics
        metrics.add_gauges(registry_gauges(self.runner.registry.snapshot), "registry")
        names = self.queue_names()

        def queues() -> list[dict[str, Any]]:
            rows = queue_status(self.connection, self.settings, utcnow())
            return [q for q in rows if q["name"] in names]

        metrics.add_gauges(queue_gauges(queues), "queues")
        return metrics

    def work(self, *args: Any, **kwargs: Any) -> bool:
        if kwargs.pop("with_scheduler", False):
            log.warning("scheduler_refused", reason="a GPU worker never forks a scheduler")
        from mlx_fusion.control import ControlLoop

        registry = self.runner.registry
        control = ControlLoop(self.connection, self.settings.queue_prefix, self.name, registry)
        with self.serving_metrics():
            try:
                control.start()
                self._preload_pinned()
                registry.start_reaper()
                return bool(super().work(*args, **kwargs))
            finally:
                control.stop()
                registry.close()

    def _preload_pinned(self) -> None:
        for spec in self.runner.registry.catalog:
            if spec.pinned:
                try:
                    self.runner.registry.load(spec.id)
                except FusionError as e:  # its jobs will report the error; the worker serves
                    log.error("pinned_model_failed", model=spec.id, code=e.code, error=e.message)

    def _mark_spooled(self, job_id: str, spooled: bool) -> None:
        key = self.settings.spooled_key(job_id)
        if spooled:
            self.connection.set(key, self.name, ex=int(self.settings.retention_days * 86400))
        else:
            self.connection.delete(key)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        try:  # results kept while the store was down go first, so recovery sees them written
            self.runner.flush_spool()
            recovered = self.recovery.run()
        except Exception as e:  # the store or Redis being down must not stop the worker
            log.warning("recovery_failed", error=f"{type(e).__name__}: {e}")
        else:
            if any(recovered.values()):
                log.info("jobs_recovered", **recovered)
        blobs = self.runner.store.blobs
        if blobs is None:
            return
        try:
            purged = blobs.purge_expired(utcnow())
        except Exception as e:  # the store being down must not stop the worker
            log.warning("blob_purge_failed", error=f"{type(e).__name__}: {e}")
            return
        if purged:
            log.info("blobs_purged", count=purged)

    def get_heartbeat_ttl(self, job: Job) -> int:
        interval = self.settings.heartbeat_interval_s
        return max(2, int(interval * defaults.HEARTBEAT_GRACE_INTERVALS + 0.999))

    def execute_job(self, job: Job, queue: Queue) -> None:
        document = job.document() if isinstance(job, FusionJob) else None
        requested = document.get("timeout_s") if isinstance(document, dict) else None
        if not isinstance(requested, (int, float)) or isinstance(requested, bool):
            requested = job.timeout if isinstance(job.timeout, (int, float)) else None
        job.timeout = self.settings.effective_timeout_s(requested)
        self.prepare_execution(job)
        cancellation = Cancellation()
        self._running_job = job.id
        self.metrics.busy.set(1)
        try:
            # the jobs of a batching model that wait in the queues join this one (batch_session)
            with (
                BatchSession.open(self, document),
                self.job_context(job, document),
                self.current(job, cancellation),
                _Heartbeat(self, job, cancellation),
            ):
                self.perform_job(job, queue)
        finally:
            self._running_job = None
            self.metrics.busy.set(0)
        self.set_state("idle")

    def job_context(self, job: Job, document: Any) -> Any:
        """Bind the log fields every line of the job carries (ours, RQ's, the model
        process's) for the length of the block."""
        echoed = safe_fields(document)
        context = {k: echoed.get(k) for k in ("request_id", "model", "kind")}
        return structlog.contextvars.bound_contextvars(worker=self.name, job_id=job.id, **context)

    @contextmanager
    def current(self, job: Job, cancellation: Cancellation) -> Iterator[None]:
        """Make ``job`` the one ``run_job`` runs in this thread, until its timeout."""
        deadline = time.monotonic() + job.timeout if isinstance(job.timeout, (int, float)) else None
        token = _CURRENT.set((self.runner, self, job, cancellation, deadline))
        try:
            yield
        finally:
            _CURRENT.reset(token)


def fetch_rq_job(connection: Any, rq_job_id: str) -> Job | None:
    """The RQ job ``rq_job_id`` (JSON serializer), or None when Redis has no such job."""
    try:
        return Job.fetch(rq_job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def drop_expired_executions(connection: Any, job_id: str) -> int:
    """Forget executions of ``job_id`` whose data has expired. RQ 2.12 keeps an execution in the
    job's execution registry 60 s longer than the execution itself, and ``Job.delete`` fails
    ("Execution ... not found in Redis") in between: exactly when a dead worker's job is
    recovered. Returns how many were dropped."""
    registry_key = f"rq:executions:{job_id}"
    ids = [i.decode() for i in connection.zrange(registry_key, 0, -1)]
    if not ids:
        return 0
    with connection.pipeline(transaction=False) as pipe:
        for execution_id in ids:
            pipe.exists(f"rq:execution:{job_id}:{execution_id}")
        alive = pipe.execute()
    expired = [i for i, there in zip(ids, alive, strict=True) if not there]
    if expired:
        connection.zrem(registry_key, *expired)
    return len(expired)


def running_job_ids(connection: Any, queue_names: Sequence[str]) -> set[str]:
    """Ids of jobs some live worker is running now: an execution in a started-job registry whose
    heartbeat has not expired. Expired executions are cleaned up first (RQ marks their jobs
    failed), so a job missing here is not running anywhere."""
    now_ts = current_timestamp()
    running: set[str] = set()
    for name in queue_names:
        registry = StartedJobRegistry(name, connection=connection, serializer=JSONSerializer)
        registry.cleanup(now_ts)
        for member in connection.zrangebyscore(registry.key, now_ts, "+inf"):
            running.add(registry.parse_job_id(member))
    return running


def worker_options(
    settings: Settings, kwargs: dict[str, Any], job_class: type[Job], name: str
) -> dict[str, Any]:
    """RQ worker options with what every mlx-fusion worker forces: the JSON serializer, its own
    job class, a unique name (unless one is given), a Redis connection from settings, and no
    job descriptions in the log."""
    from mlx_fusion.services import redis_connection

    options = {**kwargs, "serializer": JSONSerializer, "job_class": job_class}
    # RQ's default description of a raw-Redis job is the call with its arguments: the document
    options.setdefault("log_job_description", False)
    options["name"] = options.get("name") or name
    if options.get("connection") is None:
        options["connection"] = redis_connection(settings)
    return options


def queue_names_of(queues: Sequence[str | Queue] | str | Queue | None) -> list[str]:
    """Queue names from whatever RQ accepts as ``queues``."""
    if queues is None:
        return []
    items = [queues] if isinstance(queues, (str, Queue)) else list(queues)
    return [q.name if isinstance(q, Queue) else q for q in items]


from mlx_fusion.batch_session import BatchSession  # noqa: E402  (it builds on this module)
