"""What the worker does with one job document, with no RQ in sight.

``JobRunner.process``: validate the document, resolve its model, mark it processing, lease the
model, run it, then write the result (or the precise error) in one guarded store update.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from mlx_fusion.cancellation import Cancellation
from mlx_fusion.config import Settings
from mlx_fusion.errors import (
    FusionError,
    InferenceError,
    JobCancelled,
    JobStoreError,
    JobValidationError,
    error_dict,
)
from mlx_fusion.jobs.blobs import BlobWriter, blob_ref
from mlx_fusion.jobs.document import Job, Kind, Webhook, parse_job, safe_fields
from mlx_fusion.jobs.spool import Spool
from mlx_fusion.jobs.store import Document, JobStore, elapsed_ms, utcnow
from mlx_fusion.registry import ModelRegistry
from mlx_fusion.streaming import JobStream
from mlx_fusion.webhooks.outbox import pending_delivery

log = structlog.get_logger(__name__)

_STATUS_OF_OP = {"complete": "completed", "fail": "failed", "cancel": "cancelled"}
UNKNOWN_LABEL = "-"
"""The kind or model label of a job rejected before either was known."""


def webhook_of(raw: Any) -> dict[str, Any] | None:
    """The ``webhook`` of a document, when that part is valid even if the rest is not (so an
    invalid job still reports its failure to the webhook Tier 2 gave)."""
    if not isinstance(raw, Mapping) or raw.get("webhook") is None:
        return None
    try:
        return Webhook.model_validate(raw["webhook"]).model_dump(mode="json", exclude_none=True)
    except ValueError:
        return None


def with_job_id(raw: Any, job_id: str) -> Any:
    """The document with its ``id`` defaulted to the RQ job id (they must be equal)."""
    if not isinstance(raw, Mapping):
        return raw
    doc_id = raw.get("id")
    if doc_id is None:
        return {**raw, "id": job_id}
    if doc_id != job_id:
        raise JobValidationError(f"must equal the RQ job id {job_id!r}, got {doc_id!r}", "id")
    return raw


class JobRunner:
    """Runs job documents against a store and a registry."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        registry: ModelRegistry,
        *,
        notify: Callable[[Document], Any] | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.notify = notify
        """Called with the record of every job this runner finishes that has a pending webhook
        delivery (the worker queues its first attempt)."""
        self.spool = spool or Spool(settings.data_dir / "spool")
        self.mark_spooled: Callable[[str, bool], Any] | None = None
        """Called with (job id, True) when a job's final write is spooled and (job id, False)
        once it is written (the worker keeps a Redis marker, so recovery leaves the job alone)."""
        self.streams: Callable[[Job, str], JobStream | None] | None = None
        """Called with (job, model id) when a job starts: the job's stream, when it asked for
        one (the worker's, over Redis); None here means no job is streamed."""
        self.observe: Callable[[str, str, str, Mapping[str, Any]], Any] | None = None
        """Called with (final status, kind, model id, metrics) once per job this runner
        finishes (the worker's metrics); not for a duplicate whose write did not apply."""

    def _finished(self, record: Document | None) -> Document | None:
        if record is not None and self.notify is not None and record.get("webhook"):
            try:
                self.notify(record)
            except Exception as e:  # the reconciler queues what this could not
                log.warning("webhook_notify_failed", error=f"{type(e).__name__}: {e}")
        return record

    def _final(
        self, op: str, job_id: str, *, labels: tuple[str, str], **kwargs: Any
    ) -> tuple[Document | None, bool]:
        """``store.<op>(job_id, **kwargs)``, the job's final write; when the store is down the
        write is spooled to disk instead. Returns (the record, or None; spooled). ``labels``
        (kind, model) go to ``observe``."""
        try:
            record, spooled = self._finished(getattr(self.store, op)(job_id, **kwargs)), False
        except JobStoreError as e:
            kwargs.setdefault("now", utcnow())  # the time it finished, not the time it is written
            self.spool.put(job_id, op, **kwargs)
            self._mark(job_id, True)
            log.error("job_write_spooled", op=op, error=e.message, spool=str(self.spool.directory))
            record, spooled = None, True
        if self.observe is not None and (record is not None or spooled):
            try:
                self.observe(_STATUS_OF_OP[op], *labels, kwargs.get("metrics") or {})
            except Exception as e:  # metrics must never fail a job
                log.warning("job_observe_failed", error=f"{type(e).__name__}: {e}")
        return record, spooled

    def _mark(self, job_id: str, spooled: bool) -> None:
        if self.mark_spooled is not None:
            try:
                self.mark_spooled(job_id, spooled)
            except Exception as e:  # a missing marker costs at worst a duplicate run
                log.warning("spool_marker_failed", job_id=job_id, error=f"{type(e).__name__}: {e}")

    def flush_spool(self) -> int:
        """Write spooled final writes to the store, oldest first; stops at the first store error
        (still down). Returns how many were written."""
        written = 0
        for entry in self.spool.entries():
            try:
                record = getattr(self.store, entry.op)(entry.job_id, **entry.kwargs)
            except JobStoreError:
                break
            self._finished(record)
            entry.path.unlink(missing_ok=True)
            self._mark(entry.job_id, False)
            written += 1
            log.info("job_write_unspooled", job_id=entry.job_id, op=entry.op, applied=bool(record))
        return written

    def reject(self, job_id: str, raw: Any, error: FusionError) -> None:
        """Record a job that will not run (invalid document, refused function) as failed."""
        log.warning("job_rejected", job_id=job_id, code=error.code, error=error.message)
        webhook = pending_delivery(webhook_of(raw), job_id, "failed", utcnow())
        echoed = safe_fields(raw)
        labels = self._labels_of(echoed)
        self._final(
            "fail",
            job_id,
            labels=labels,
            error=error.to_dict(),
            spec_doc=echoed,
            webhook=webhook,
        )

    def _labels_of(self, echoed: Mapping[str, str]) -> tuple[str, str]:
        """(kind, model id) metric labels of a rejected job: only known values, so that
        producer-chosen strings cannot grow the label sets without bound."""
        kind = echoed.get("kind", "")
        model = UNKNOWN_LABEL
        if "model" in echoed:
            with contextlib.suppress(FusionError):
                model = self.registry.catalog.resolve(echoed["model"]).id
        return (kind if kind in {k.value for k in Kind} else UNKNOWN_LABEL), model

    def _blob_writer(self, job: Job) -> BlobWriter:
        def put(name: str, data: bytes, content_type: str) -> dict[str, Any]:
            blobs = self.store.blobs
            if blobs is None:
                raise JobStoreError("this job store keeps no blobs")
            expire_at = utcnow() + self.store.retention
            blob_id = blobs.put(
                job.spec.id, name, data, content_type=content_type, expire_at=expire_at
            )
            return blob_ref(blob_id, data, content_type)

        return put

    def _cancelled(
        self, job: Job, labels: tuple[str, str], webhook: Any, cause: BaseException
    ) -> dict[str, Any]:
        outbox = pending_delivery(webhook, job.spec.id, "cancelled", utcnow())
        self._final("cancel", job.spec.id, labels=labels, webhook=outbox, running=True)
        log.info("job_cancelled", stopped_by=type(cause).__name__)
        return {"id": job.spec.id, "status": "cancelled"}

    def process(
        self,
        raw: Any,
        job_id: str,
        *,
        worker: str,
        enqueued_at: dt.datetime | None = None,
        cancellation: Cancellation | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Run one job document to a final status; raises the job's error after recording it.
        A job cancelled while it runs (``cancellation``) ends ``cancelled`` and raises nothing;
        one still running at ``deadline`` (``time.monotonic()``) fails with ``timeout``."""
        try:
            job = parse_job(with_job_id(raw, job_id), max_input_bytes=self.settings.max_input_bytes)
        except FusionError as e:
            self.reject(job_id, raw, e)
            raise
        spec = job.spec
        # bound until the caller's scope ends (the worker binds these keys for the whole job,
        # so RQ's own lines after the job carry them too)
        structlog.contextvars.bind_contextvars(
            job_id=spec.id, request_id=spec.request_id, model=spec.model, kind=job.kind.value
        )
        return self._run(
            job,
            worker=worker,
            enqueued_at=enqueued_at,
            cancel=cancellation or Cancellation(),
            deadline=deadline,
        )

    def _run(
        self,
        job: Job,
        *,
        worker: str,
        enqueued_at: dt.datetime | None,
        cancel: Cancellation,
        deadline: float | None,
    ) -> dict[str, Any]:
        spec_doc = job.spec.to_document()
        try:
            model = self.registry.resolve(job.spec.model, job.kind)
            job = self.registry.prepare(model, job)
        except FusionError as e:
            self.reject(job.spec.id, spec_doc, e)
            raise
        webhook = spec_doc.get("webhook")
        labels = (job.kind.value, model.id)
        doc = self.store.start(
            job.spec.id, worker, spec_doc=spec_doc, enqueued_at=enqueued_at, model_id=model.id
        )
        if doc is None:
            current = self.store.get(job.spec.id) or {}
            log.info("job_skipped", status=current.get("status"))
            return {"id": job.spec.id, "status": current.get("status"), "skipped": True}
        metrics: dict[str, Any] = {
            "queue_wait_ms": max(0.0, elapsed_ms(doc["created_at"], doc["started_at"]))
        }
        log.info("job_started", attempts=doc.get("attempts"), **metrics)
        stream = self.streams(job, model.id) if self.streams is not None else None
        on_token = stream.on_token if stream is not None and stream.live else None
        try:
            with self.registry.lease(model) as lease:
                metrics["load_ms"] = lease.load_ms
                with cancel.attached(lease):
                    left_s = None if deadline is None else max(0.001, deadline - time.monotonic())
                    result, run_metrics = lease.run(job, timeout_s=left_s, on_token=on_token)
            result = self.registry.finish(model, job, result, self._blob_writer(job))
        except Exception as e:
            if cancel.requested.is_set():  # however it ended (a check, a kill), it was cancelled
                if stream is not None:
                    stream.fail(JobCancelled("the job was cancelled").to_dict())
                return self._cancelled(job, labels, webhook, e)
            err = e if isinstance(e, FusionError) else InferenceError(f"{type(e).__name__}: {e}")
            if stream is not None:  # before the final write: a reader that sees it stops waiting
                stream.fail(error_dict(err))
            outbox = pending_delivery(webhook, job.spec.id, "failed", utcnow())
            self._final(
                "fail",
                job.spec.id,
                labels=labels,
                error=error_dict(err),
                metrics=metrics,
                webhook=outbox,
            )
            log.warning("job_failed", code=err.code, error=str(err))
            if err is e:
                raise
            raise err from e
        metrics.update(run_metrics)
        if stream is not None:
            stream.complete(result)
        done, spooled = self._final(
            "complete",
            job.spec.id,
            labels=labels,
            result=result,
            metrics=metrics,
            max_inline_bytes=self.settings.max_result_bytes,
            webhook=pending_delivery(webhook, job.spec.id, "completed", utcnow()),
        )
        if spooled:
            return {"id": job.spec.id, "status": "completed", "spooled": True}
        if done is None:
            log.warning("job_result_discarded", reason="job no longer processing")
            return {"id": job.spec.id, "status": "discarded"}
        log.info("job_completed", **metrics)
        return {"id": job.spec.id, "status": "completed"}
