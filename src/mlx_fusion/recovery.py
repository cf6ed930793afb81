"""Recovery of jobs lost by dead workers or by Redis: records in MongoDB that no RQ job will ever
finish.

Run by idle GPU workers every ``recovery_interval_s`` (and at start):

- a ``processing`` record whose job no live worker runs (no unexpired execution in RQ's
  started-job registries: its worker died, was killed, lost power or lost Redis) is queued again
  when it has started fewer than ``job_max_attempts`` times, otherwise failed with
  ``worker_lost`` (its webhook gets ``job.failed``);
- a ``queued`` record with no RQ job queued, scheduled or running (Redis lost it, or the producer
  died between writing the record and enqueuing) is enqueued again from the record.

Records younger than ``recovery_grace_s`` are left alone, and so are jobs whose final write waits
in a worker's spool (the store was down when they finished; a Redis marker says so). A dead
worker's job is noticed once its heartbeat expires (``HEARTBEAT_GRACE_INTERVALS`` x
``heartbeat_interval_s``) and recovered at the next recovery run after that. Every change is a
guarded update, so concurrent recoveries on several workers act once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError
from rq.job import JobStatus

from mlx_fusion.client import enqueue_spec
from mlx_fusion.config import Settings
from mlx_fusion.errors import JobStoreError, WorkerLost
from mlx_fusion.jobs.document import JobSpec, Status
from mlx_fusion.jobs.store import Document, JobStore, requeue_update, utcnow
from mlx_fusion.webhooks.outbox import pending_delivery
from mlx_fusion.worker import drop_expired_executions, fetch_rq_job, running_job_ids

log = structlog.get_logger(__name__)

_WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED})
_BATCH = 200


def spec_of(record: Mapping[str, Any]) -> JobSpec:
    """The job document a record was made from (its submitted fields)."""
    fields = {k: record[k] for k in JobSpec.model_fields if k in record and record[k] is not None}
    return JobSpec.model_validate({**fields, "id": record["id"]})


class JobRecovery:
    """Finds lost jobs and queues or fails them (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        connection: Redis,
        *,
        notify: Callable[[Document], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.connection = connection
        self.notify = notify

    def _enqueue(self, record: Mapping[str, Any]) -> None:
        old = fetch_rq_job(self.connection, str(record["id"]))
        if old is not None:
            drop_expired_executions(self.connection, old.id)
            old.delete()  # a failed or abandoned run: the new one takes its id
        enqueue_spec(self.connection, self.settings, spec_of(record))

    def run(self, now: dt.datetime | None = None) -> dict[str, int]:
        """One recovery pass; counts of jobs requeued (from processing), failed, re-enqueued (from
        queued) and skipped (another recovery was first)."""
        now = now or utcnow()
        cutoff = self.store.query_time(now - dt.timedelta(seconds=self.settings.recovery_grace_s))
        running = running_job_ids(self.connection, self.settings.queue_names())
        counts = {"requeued": 0, "failed": 0, "enqueued": 0, "skipped": 0}
        stale = {"status": Status.PROCESSING.value, "updated_at": {"$lte": cutoff}}
        for record in self.store.find(stale, sort="updated_at", limit=_BATCH):
            if record["id"] in running:
                continue
            if self.connection.exists(self.settings.spooled_key(str(record["id"]))):
                continue  # finished; its result waits in a worker's spool for the store
            with self._isolated(record):
                counts[self._recover_processing(record, now)] += 1
        waiting = {"status": Status.QUEUED.value, "updated_at": {"$lte": cutoff}}
        for record in self.store.find(waiting, sort="updated_at", limit=_BATCH):
            with self._isolated(record):
                rq_job = fetch_rq_job(self.connection, str(record["id"]))
                status = rq_job.get_status(refresh=False) if rq_job is not None else None
                if status in _WAITING or record["id"] in running:
                    continue
                self._enqueue(record)
                counts["enqueued"] += 1
                log.warning("job_reenqueued", job_id=record["id"], rq_status=status)
        return counts

    @contextmanager
    def _isolated(self, record: Document) -> Iterator[None]:
        """One record that cannot be recovered (a record no job document can be rebuilt from)
        must not stop the recovery of the others; store and Redis errors still end the pass."""
        try:
            yield
        except (JobStoreError, RedisError):
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.error("job_unrecoverable", job_id=record.get("id"), error=error)

    def _recover_processing(self, record: Document, now: dt.datetime) -> str:
        job_id, attempts = str(record["id"]), int(record.get("attempts") or 0)
        if attempts < self.settings.job_max_attempts:
            if self.store.transition(requeue_update(job_id, attempts, now)) is None:
                return "skipped"  # another recovery (or the job itself) moved it first
            self._enqueue(record)
            log.warning("job_requeued", job_id=job_id, attempts=attempts, worker=record["worker"])
            return "requeued"
        error = WorkerLost(
            f"the worker running this job ({record.get('worker')}) died; "
            f"{attempts} of {self.settings.job_max_attempts} attempts used"
        )
        webhook = pending_delivery(record.get("webhook"), job_id, Status.FAILED.value, now)
        done = self.store.fail(job_id, error.to_dict(), webhook=webhook, now=now)
        if done is not None and self.notify is not None and done.get("webhook"):
            self.notify(done)
        log.error("job_lost", job_id=job_id, attempts=attempts, worker=record["worker"])
        return "failed"
