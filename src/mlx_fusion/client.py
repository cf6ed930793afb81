"""The Tier-2 side in Python: submit jobs, read them back, wait, stream, list, cancel.

Producers in other languages use the raw Redis commands documented in ``docs/contract.md``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.serializers import JSONSerializer

from mlx_fusion import defaults
from mlx_fusion.config import Settings
from mlx_fusion.errors import FusionError
from mlx_fusion.jobs.document import FINAL_STATUSES, JobSpec, parse_job
from mlx_fusion.jobs.store import JobStore, utcnow
from mlx_fusion.streaming import (
    STREAM_BLOCK_MS,
    STREAM_READ_TIMEOUT_S,
    StreamEntry,
    ended_without_stream,
    not_streamed,
    read_stream,
    stream_key,
)

Record = dict[str, Any]
Records = list[Record]


class EnqueueError(FusionError):
    """The job was stored but could not be put on its Redis queue (it is marked failed)."""

    code = "enqueue_failed"


def enqueue_spec(redis: Redis, settings: Settings, spec: JobSpec) -> None:
    """Put a job on its priority's queue as the RQ job ``spec.id`` running ``run_job(document)``
    (the store record is the caller's business)."""
    enqueue_specs(redis, settings, [spec])


def enqueue_specs(redis: Redis, settings: Settings, specs: Iterable[JobSpec]) -> None:
    """``enqueue_spec`` for several jobs, in one pipeline (one round trip to Redis)."""
    with redis.pipeline() as pipe:
        for spec in specs:
            queue = Queue(
                settings.queue_name(spec.priority.value),
                connection=redis,
                serializer=JSONSerializer,
            )
            data = Queue.prepare_data(
                defaults.JOB_FUNCTION,
                args=(spec.to_document(),),
                job_id=spec.id,
                timeout=settings.effective_timeout_s(spec.timeout_s),
                result_ttl=settings.result_ttl_s,
                # RQ keeps a failed job (document included) a year by default; the record is
                # the truth
                failure_ttl=int(settings.retention_days * 86400),
                description=f"{spec.kind} {spec.model} ({spec.request_id})",
                meta={"model": spec.model},  # read by the workers' model-aware scheduling
            )
            queue.enqueue_many([data], pipeline=pipe)
        pipe.execute()


class Client:
    """Submit and follow jobs. ``redis`` and ``store`` are built by the caller (see
    ``mlx_fusion.services``) so one client can be shared."""

    def __init__(self, settings: Settings, redis: Redis, store: JobStore) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store

    def submit(self, job: JobSpec | Mapping[str, Any]) -> str:
        """Validate, store as queued and enqueue; returns the job id. A job whose
        ``idempotency_key`` was seen before with the same body is not enqueued again: its first
        id is returned (``IdempotencyConflict`` when the body differs)."""
        raw = job.to_document() if isinstance(job, JobSpec) else job
        spec = parse_job(raw, max_input_bytes=self.settings.max_input_bytes).spec
        job_id, created = self.store.insert(spec)
        if created:
            self._enqueue_stored([spec])
        return job_id

    def submit_many(self, jobs: Iterable[JobSpec | Mapping[str, Any]]) -> list[str]:
        """``submit`` for many jobs at once (a fan-out): every job is validated before any is
        stored (one invalid job raises and nothing is submitted), then each is stored as queued
        and all are enqueued in one round trip to Redis, so workers see them together and can
        batch them. Returns the ids in order. Should storing one fail, the jobs stored before it
        are still enqueued, and the error is raised."""
        raws = [job.to_document() if isinstance(job, JobSpec) else job for job in jobs]
        specs = [parse_job(raw, max_input_bytes=self.settings.max_input_bytes).spec for raw in raws]
        ids: list[str] = []
        new: list[JobSpec] = []
        try:
            for spec in specs:
                job_id, created = self.store.insert(spec)
                ids.append(job_id)
                if created:
                    new.append(spec)
        finally:  # what was stored is enqueued, even when storing a later job failed
            self._enqueue_stored(new)
        return ids

    def _enqueue_stored(self, new: list[JobSpec]) -> None:
        if not new:
            return
        try:
            enqueue_specs(self.redis, self.settings, new)
        except RedisError as e:
            for spec in new:
                self.store.fail(
                    spec.id, EnqueueError(f"could not enqueue job {spec.id}: {e}").to_dict()
                )
            what = f"job {new[0].id}" if len(new) == 1 else f"{len(new)} jobs"
            raise EnqueueError(f"could not enqueue {what}: {e}") from e

    def get(self, job_id: str) -> Record | None:
        """The job's document (status, result, error, metrics), or None."""
        return self.store.get(job_id)

    def get_result(self, job_id: str) -> Any:
        """A completed job's result, fetched from the blob store when it was too large to keep in
        the record (``result_ref``)."""
        return self.store.result(job_id)

    def get_blob(self, blob_id: str) -> bytes:
        """The bytes of a stored output (``blob_id`` from a result or ``result_ref``)."""
        if self.store.blobs is None:
            raise FusionError("this job store keeps no blobs")
        return self.store.blobs.get(blob_id)

    def get_image(self, job_id: str, index: int = 0) -> bytes:
        """The PNG bytes of image ``index`` of a completed image job."""
        result = self.get_result(job_id) or {}
        try:
            blob_id = result["data"][index]["blob_id"]
        except (KeyError, IndexError, TypeError) as e:
            raise FusionError(f"job {job_id} has no image {index}") from e
        return self.get_blob(blob_id)

    def wait(self, job_id: str, timeout_s: float, *, poll_s: float = 0.2) -> Record:
        """Poll until the job is completed, failed or cancelled; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.store.get(job_id)
            if record is not None and record.get("status") in FINAL_STATUSES:
                return record
            if time.monotonic() >= deadline:
                status = record.get("status") if record else "unknown"
                raise TimeoutError(f"job {job_id} still {status} after {timeout_s} s")
            time.sleep(poll_s)

    def stream(
        self, job_id: str, *, timeout_s: float = STREAM_READ_TIMEOUT_S
    ) -> Iterator[dict[str, Any]]:
        """The OpenAI chunks of a job submitted with ``stream: true``, as they are produced
        (``chat.completion.chunk`` or ``text_completion`` objects; relay each as an SSE
        ``data:`` line, then ``data: [DONE]`` when this ends). Waits while the job is queued.

        Raises ``StreamUnavailable`` when the job was not submitted with ``stream: true`` (at
        once) or ended without a complete stream (expired, trimmed, ran again); the job's own
        error (``JobCancelled``, ``InferenceError``, ...) when it failed or was cancelled;
        ``StreamTimeout`` when nothing arrives for ``timeout_s``."""
        for entry in self.iter_stream_entries(job_id, timeout_s=timeout_s):
            assert entry.chunk is not None
            yield entry.chunk

    def iter_stream_entries(
        self,
        job_id: str,
        *,
        timeout_s: float = STREAM_READ_TIMEOUT_S,
        last_id: str = "0",
        block_ms: int = STREAM_BLOCK_MS,
    ) -> Iterator[StreamEntry]:
        """``stream`` with each chunk's entry: its Redis id (resume after ``last_id``),
        ``produced_at`` (worker clock) and ``received_at`` (this host's clock), for benchmarks
        and relays. The job record is read before and between ``XREAD`` calls (every
        ``block_ms``), so a job that ends without its stream ends the wait at once."""
        key = stream_key(self.settings.queue_prefix, job_id)
        seen_final = False

        def check_record() -> None:
            nonlocal seen_final
            record = self.store.get(job_id)
            if record is None:  # not stored yet (a raw Redis producer): the worker will
                return
            if (refused := not_streamed(record)) is not None:
                raise refused
            if record.get("status") not in FINAL_STATUSES:
                return
            # the writer ends the stream before the record turns final, so a missing key means
            # no stream is coming; one more read picks up entries that raced the record
            if seen_final or not self.redis.exists(key):
                raise ended_without_stream(record)
            seen_final = True

        check_record()
        yield from read_stream(
            self.redis,
            self.settings.queue_prefix,
            job_id,
            timeout_s=timeout_s,
            block_ms=block_ms,
            last_id=last_id,
            on_idle=check_record,
        )

    def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """Jobs, newest first."""
        return self.store.list(status=status, model=model, since=since, until=until, limit=limit)

    def models(self) -> Records:
        """Every model the running workers serve, sorted by id: its catalog details (``kind``,
        ``aliases``, ``family``, ``context_length``, ``quantization``, ``size_on_disk_bytes``,
        ...; see ``registry.describe``), ``workers`` (the workers that serve it) and
        ``loaded_on`` (``{worker, state, bytes, in_use}`` for each worker that has it loaded).

        Read from what the workers publish in Redis, so it needs no catalog file here; with no
        worker running it describes the local catalog (``catalog_path``) if there is one."""
        from mlx_fusion import control

        prefix = self.settings.queue_prefix
        found: dict[str, Record] = {}
        for worker in control.workers(self.redis, prefix):
            snapshot = control.read_snapshot(self.redis, prefix, worker) or {}
            loaded = {m.get("id"): m for m in snapshot.get("models", [])}
            for described in control.read_catalog(self.redis, prefix, worker):
                entry = found.setdefault(
                    described["id"], {**described, "workers": [], "loaded_on": []}
                )
                entry["workers"].append(worker)
                if (m := loaded.get(described["id"])) is not None:
                    entry["loaded_on"].append(
                        {"worker": worker, **{k: m.get(k) for k in ("state", "bytes", "in_use")}}
                    )
        if not found and self.settings.catalog_path.is_file():
            from mlx_fusion.registry.catalog import Catalog
            from mlx_fusion.registry.describe import describe_catalog

            catalog = Catalog.load(self.settings.catalog_path)
            found = {
                d["id"]: {**d, "workers": [], "loaded_on": []} for d in describe_catalog(catalog)
            }
        return [found[k] for k in sorted(found)]

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: a queued one at once; a running one is stopped by its worker within
        about a second (or its model process is killed after ``cancel_grace_s``) and then ends
        ``cancelled``. Either way its webhook gets ``job.cancelled``. False when the job is
        unknown or already finished."""
        from mlx_fusion.webhooks.outbox import Outbox, pending_delivery

        current = self.store.get(job_id) or {}
        if current.get("status") == "queued":
            webhook = pending_delivery(current.get("webhook"), job_id, "cancelled", utcnow())
            done = self.store.cancel(job_id, webhook=webhook)
            if done is not None:
                Outbox(self.settings, self.store, self.redis).notify(done)
                try:
                    rq_job = RQJob.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
                    rq_job.cancel()
                except (NoSuchJobError, InvalidJobOperation, RedisError):
                    pass  # the store already says cancelled, so a worker that dequeues it skips it
                return True
            current = self.store.get(job_id) or {}  # a worker took it meanwhile
        if current.get("status") == "processing":
            ttl_s = self.settings.job_timeout_max_s + 60
            self.redis.set(self.settings.cancel_key(job_id), "1", ex=ttl_s)
            return True
        return False
