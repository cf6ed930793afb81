"""Batch sessions: while the worker runs a job of a model that batches, the waiting jobs of that
model join it, so they run together in one batch in the model's process (continuous batching).

The worker runs RQ's usual lifecycle for the job it dequeued (the leader). Beside it, a feeder
thread claims waiting jobs of the same model, up to the model's batch limit in flight, as soon as
the model is loaded, and again whenever one finishes, until nothing of that model waits and
nothing runs. Each claimed job (a companion) gets an RQ lifecycle of its own, in its own thread:

- claimed atomically (``Scheduler.claim``: out of the queue and marked started in one script;
  should the worker die right then, recovery re-enqueues it from its ``queued`` record);
- an execution in the started-job registry, heartbeats and a cancel watcher (``_Heartbeat``);
- ``run_job`` through the same ``JobRunner`` (status, result, errors, webhook, its own timeout);
- RQ's success or failure bookkeeping: result, finished or failed registry, execution removed.

Claims follow the scheduler's rules: only from the highest-priority non-empty queue, and none
once a job of another model has waited ``schedule_max_wait_s`` at its head; a warm shutdown
stops claims, and so does a session older than the maintenance interval once its leader has
finished (the worker's maintenance runs between leaders; while a leader runs, claims cost it
nothing, so a long job does not shut its batch to newcomers).
This is the only module besides ``worker`` that touches RQ internals.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import JobStatus
from rq.utils import now

from mlx_fusion.cancellation import Cancellation
from mlx_fusion.errors import FusionError
from mlx_fusion.jobs.document import Kind

if TYPE_CHECKING:
    from rq.job import Job

    from mlx_fusion.worker import FusionWorker

log = structlog.get_logger(__name__)

CLAIM_POLL_S = 0.02
"""How often the feeder looks for jobs to claim while the batch has room."""

LOAD_POLL_S = 0.01
"""How often the feeder checks whether the leader's model has loaded."""

_BATCHING_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION, Kind.EMBEDDING})


class BatchSession:
    """The companions of one leader job (see the module docstring)."""

    def __init__(self, worker: FusionWorker, model: str, limit: int) -> None:
        self.worker = worker
        self.model = model
        self.limit = limit
        self._leader_running = True
        self._companions: set[threading.Thread] = set()
        self._cond = threading.Condition()
        self._started = time.monotonic()
        self._feeder = threading.Thread(target=self._feed, name="fusion-batch-feeder", daemon=True)
        self.claimed = 0

    @classmethod
    @contextmanager
    def open(cls, worker: FusionWorker, document: Any) -> Iterator[BatchSession | None]:
        """A session for the leader ``document`` while the block runs (None when its model does
        not batch); on exit, waits for every companion to finish."""
        try:
            model, limit = cls._batching(worker, document)
        except Exception as e:  # never let a job's document stop the worker
            log.warning("batch_check_failed", error=f"{type(e).__name__}: {e}")
            model, limit = None, 1
        if model is None or limit <= 1:
            yield None
            return
        session = cls(worker, model, limit)
        session._feeder.start()
        try:
            yield session
        finally:
            with session._cond:
                session._leader_running = False
                session._cond.notify_all()
            session._feeder.join()

    @staticmethod
    def _batching(worker: FusionWorker, document: Any) -> tuple[str | None, int]:
        if not isinstance(document, Mapping):
            return None, 1
        name, kind = document.get("model"), document.get("kind")
        # a producer may send anything: only a text kind and a text model name can batch
        if not isinstance(name, str) or not isinstance(kind, str):
            return None, 1
        if kind not in {k.value for k in _BATCHING_KINDS}:
            return None, 1
        registry = worker.runner.registry
        try:
            spec = registry.resolve(name, Kind(kind))
        except (FusionError, ValueError):
            return None, 1
        return spec.id, registry.batch_limit(spec)

    # ----- the feeder ---------------------------------------------------------------------

    def _in_flight(self) -> int:
        self._companions = {t for t in self._companions if t.is_alive()}
        return len(self._companions) + (1 if self._leader_running else 0)

    def _may_claim(self) -> bool:
        worker = self.worker
        if worker._stop_requested:
            return False
        age = time.monotonic() - self._started
        return self._leader_running or age < worker.settings.maintenance_interval_s("gpu")

    def _feed(self) -> None:
        registry = self.worker.runner.registry
        while True:
            with self._cond:
                busy = self._in_flight()
                if busy == 0:
                    return
                if self.model not in registry.loaded():
                    self._cond.wait(LOAD_POLL_S)
                    continue
                room = self.limit - busy if self._may_claim() else 0
            if room > 0:
                try:
                    self._claim(room)
                except Exception as e:  # a missed claim costs throughput, never a job
                    log.warning("batch_claim_failed", error=f"{type(e).__name__}: {e}")
            with self._cond:
                self._cond.wait(CLAIM_POLL_S)

    def _claim(self, room: int) -> None:
        worker = self.worker
        keys = [q.key for q in worker._ordered_queues]
        found = worker.model_scheduler.batchable(keys, self.model, time.time(), room)
        if found is None:
            return
        key, ids = found
        for job_id in worker.model_scheduler.claim(key, ids, worker.name):
            queue = next(q for q in worker._ordered_queues if q.key == key)
            thread = threading.Thread(
                target=self._companion,
                args=(job_id, queue),
                name=f"fusion-batch-{job_id[:16]}",
                daemon=True,
            )
            with self._cond:
                self._companions.add(thread)
            self.claimed += 1
            thread.start()

    # ----- one companion ------------------------------------------------------------------

    def _companion(self, job_id: str, queue: Any) -> None:
        worker = self.worker
        try:
            job = worker.job_class.fetch(
                job_id, connection=worker.connection, serializer=worker.serializer
            )
        except NoSuchJobError:
            log.warning("batch_job_vanished", job_id=job_id)
            return
        try:
            execution = self._start(job)
            self._perform(job, execution)
        except Exception as e:  # RQ bookkeeping failed (Redis down): recovery takes the job
            log.error(
                "batch_job_bookkeeping_failed", job_id=job_id, error=f"{type(e).__name__}: {e}"
            )
        finally:
            with self._cond:
                self._cond.notify_all()

    def _start(self, job: Job) -> Execution:
        worker = self.worker
        document = job.document() if hasattr(job, "document") else None
        requested = document.get("timeout_s") if isinstance(document, dict) else None
        if not isinstance(requested, (int, float)) or isinstance(requested, bool):
            requested = job.timeout if isinstance(job.timeout, (int, float)) else None
        job.timeout = worker.settings.effective_timeout_s(requested)
        ttl = worker.get_heartbeat_ttl(job)
        with worker.connection.pipeline() as pipe:
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=worker.name)
            job.prepare_for_execution(worker.name, pipeline=pipe)
            pipe.execute()
        return execution

    def _beat(self, job: Job, execution: Execution) -> None:
        worker = self.worker
        ttl = worker.get_heartbeat_ttl(job)
        with worker.connection.pipeline() as pipe:
            worker.heartbeat(worker.job_monitoring_interval + 60, pipeline=pipe)
            execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()
        worker._beat_ok()

    def _perform(self, job: Job, execution: Execution) -> None:
        from mlx_fusion.worker import _Heartbeat

        worker = self.worker
        cancellation = Cancellation()
        document = job.document() if hasattr(job, "document") else None
        with (
            worker.job_context(job, document),
            worker.current(job, cancellation),
            _Heartbeat(worker, job, cancellation, beat=lambda: self._beat(job, execution)),
        ):
            job.started_at = now()
            try:
                value = job.perform()
            except Exception:
                job.ended_at = now()
                self._failed(job, execution, traceback.format_exc())
                log.info("batch_job_failed", batch_model=self.model)
            else:
                job.ended_at = now()
                job._result = value
                self._succeeded(job, execution)

    def _result_fields(self, job: Job, execution: Execution) -> dict[str, Any]:
        """What RQ records of the execution with a job's result (success or failure)."""
        return {
            "worker_name": self.worker.name,
            "execution_id": execution.id,
            "execution_started_at": execution.created_at,
            "execution_ended_at": job.ended_at,
        }

    def _succeeded(self, job: Job, execution: Execution) -> None:
        worker = self.worker
        result_ttl = job.get_result_ttl(worker.default_result_ttl)
        with worker.connection.pipeline() as pipe:
            worker.increment_successful_job_count(pipeline=pipe)
            job._handle_success(result_ttl, pipeline=pipe, **self._result_fields(job, execution))
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            execution.delete(job=job, pipeline=pipe)
            pipe.execute()

    def _failed(self, job: Job, execution: Execution, exc_string: str) -> None:
        worker = self.worker
        with worker.connection.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            execution.delete(job=job, pipeline=pipe)
            job._handle_failure(exc_string, pipeline=pipe, **self._result_fields(job, execution))
            worker.increment_failed_job_count(pipe)
            pipe.execute()
