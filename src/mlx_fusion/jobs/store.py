"""The job store: one MongoDB document per job, ``_id`` = job id.

Every status change is a single ``find_one_and_update`` filtered on the statuses it may come from,
so a late or duplicate run never overwrites a finished job. The update documents are built by pure
functions (``*_update``) and applied by ``JobStore``; the same code runs on MongoDB (pymongo),
mongomock (tests) and montydb (the embedded single-host store).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from mlx_fusion.errors import IdempotencyConflict, JobStoreError
from mlx_fusion.jobs.blobs import BlobStore, blob_ref
from mlx_fusion.jobs.document import JobSpec, Status

Document = dict[str, Any]
Documents = list[Document]
Update = tuple[Document, Document]
"""A (filter, update) pair for ``find_one_and_update``."""


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC, at millisecond precision (what MongoDB keeps)."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def as_utc(value: Any) -> Any:
    """Datetimes read back from a store as aware UTC (some backends return naive UTC)."""
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def elapsed_ms(start: dt.datetime, end: dt.datetime) -> float:
    """Milliseconds from ``start`` to ``end`` (naive values are taken as UTC)."""
    delta: dt.timedelta = as_utc(end) - as_utc(start)
    return round(delta.total_seconds() * 1000, 3)


def queued_document(spec: JobSpec, now: dt.datetime) -> Document:
    """The document a producer inserts when it submits a job."""
    doc = spec.to_document()
    doc["_id"] = doc.pop("id")
    doc.update(status=Status.QUEUED.value, created_at=now, updated_at=now, attempts=0)
    if spec.idempotency_key is not None:
        doc["idempotency_hash"] = spec.body_hash()
    return doc


def _spec_fields(spec_doc: Mapping[str, Any] | None) -> Document:
    fields = dict(spec_doc or {})
    fields.pop("id", None)
    fields.pop("_id", None)
    return fields


def _outbox(webhook: Mapping[str, Any] | None) -> Document:
    """The ``$set`` entry recording a pending webhook delivery (the outbox) with a final status."""
    return {"webhook": dict(webhook)} if webhook else {}


def start_update(
    job_id: str,
    worker: str,
    now: dt.datetime,
    *,
    spec_doc: Mapping[str, Any] | None = None,
    enqueued_at: dt.datetime | None = None,
    model_id: str | None = None,
) -> Update:
    """queued|processing -> processing (a re-run after a lost worker may start again).
    ``model_id`` is the catalog id the job's ``model`` (maybe an alias) resolved to."""
    created_at = enqueued_at or now
    on_insert = {**_spec_fields(spec_doc), "created_at": created_at}
    sets: Document = {
        "status": Status.PROCESSING.value,
        "started_at": now,
        "updated_at": now,
        "worker": worker,
    }
    if model_id is not None:
        sets["model_id"] = model_id
    return (
        {"_id": job_id, "status": {"$in": [Status.QUEUED.value, Status.PROCESSING.value]}},
        {
            "$set": sets,
            "$inc": {"attempts": 1},
            "$setOnInsert": on_insert,
        },
    )


def requeue_update(job_id: str, attempts: int, now: dt.datetime) -> Update:
    """processing -> queued for a job no worker runs any more (its worker died), guarded on the
    attempt count seen, so two recoveries cannot both requeue it."""
    return (
        {"_id": job_id, "status": Status.PROCESSING.value, "attempts": attempts},
        {
            "$set": {"status": Status.QUEUED.value, "updated_at": now, "recovered_at": now},
            "$inc": {"recoveries": 1},
        },
    )


def complete_update(
    job_id: str,
    result: Any,
    metrics: Mapping[str, Any],
    now: dt.datetime,
    retention: dt.timedelta,
    *,
    result_ref: Mapping[str, Any] | None = None,
    webhook: Mapping[str, Any] | None = None,
) -> Update:
    """processing -> completed, with the result (or a reference to it), metrics and the pending
    webhook delivery, in one write."""
    sets = {
        "status": Status.COMPLETED.value,
        "finished_at": now,
        "updated_at": now,
        "expire_at": now + retention,
        "result": result,
        **({"result_ref": dict(result_ref)} if result_ref else {}),
        **{f"metrics.{k}": v for k, v in metrics.items()},
        **_outbox(webhook),
    }
    return {"_id": job_id, "status": Status.PROCESSING.value}, {"$set": sets}


def fail_update(
    job_id: str,
    error: Mapping[str, Any],
    now: dt.datetime,
    retention: dt.timedelta,
    *,
    spec_doc: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    webhook: Mapping[str, Any] | None = None,
) -> Update:
    """queued|processing -> failed, with the pending webhook delivery; creates the document when
    no producer did."""
    sets = {
        "status": Status.FAILED.value,
        "finished_at": now,
        "updated_at": now,
        "expire_at": now + retention,
        "error": dict(error),
        **{f"metrics.{k}": v for k, v in (metrics or {}).items()},
        **_outbox(webhook),
    }
    on_insert = {**_spec_fields(spec_doc), "created_at": now, "attempts": 0}
    if webhook:
        on_insert.pop("webhook", None)  # $set writes it; one update may not name a path twice
    return (
        {"_id": job_id, "status": {"$in": [Status.QUEUED.value, Status.PROCESSING.value]}},
        {"$set": sets, "$setOnInsert": on_insert},
    )


def cancel_update(
    job_id: str,
    now: dt.datetime,
    retention: dt.timedelta,
    *,
    webhook: Mapping[str, Any] | None = None,
    running: bool = False,
) -> Update:
    """queued -> cancelled (or, with ``running``, processing -> cancelled: the worker stopped the
    job), with the pending webhook delivery."""
    sets = {
        "status": Status.CANCELLED.value,
        "finished_at": now,
        "updated_at": now,
        "expire_at": now + retention,
        **_outbox(webhook),
    }
    before = Status.PROCESSING if running else Status.QUEUED
    return {"_id": job_id, "status": before.value}, {"$set": sets}


def _aware(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _aware(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_aware(v) for v in value]
    return as_utc(value)


_NESTED_TIMES = frozenset({"metrics", "webhook"})
"""Fields whose nested datetimes are made aware too (results are left as they are)."""


def to_record(doc: Mapping[str, Any]) -> Document:
    """A stored document as the client sees it: ``id`` instead of ``_id``, aware datetimes."""
    out: Document = {"id": doc["_id"]}
    for key, value in doc.items():
        if key == "_id":
            continue
        out[key] = _aware(value) if key in _NESTED_TIMES else as_utc(value)
    return out


class JobStore:
    """Job documents in one collection (pymongo, mongomock or montydb)."""

    def __init__(
        self,
        collection: Any,
        *,
        retention: dt.timedelta = dt.timedelta(days=7),
        duplicate_errors: tuple[type[BaseException], ...] = (DuplicateKeyError,),
        store_errors: tuple[type[BaseException], ...] = (PyMongoError,),
        naive_datetimes: bool = False,
        blobs: BlobStore | None = None,
        serialize: bool = False,
    ) -> None:
        self.collection = collection
        self.retention = retention
        self._duplicate = duplicate_errors
        self._errors = store_errors
        self._naive = naive_datetimes
        self.blobs = blobs
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if serialize else contextlib.nullcontext()
        )
        """Held around every operation for a backend that is not thread-safe (the embedded
        montydb and mongomock): the jobs of a batch write from their own threads."""

    def query_time(self, value: dt.datetime) -> dt.datetime:
        """A datetime as this backend compares it in queries."""
        # montydb compares stored (naive UTC) datetimes with query values as they are
        value = as_utc(value).astimezone(dt.UTC)
        return value.replace(tzinfo=None) if self._naive else value

    def ensure_indexes(self) -> None:
        """Create the indexes the queries and the retention need (idempotent)."""
        col = self.collection
        self._call(col.create_index, [("status", ASCENDING), ("created_at", ASCENDING)])
        self._call(col.create_index, [("model", ASCENDING), ("created_at", DESCENDING)])
        self._call(col.create_index, [("request_id", ASCENDING)])
        self._call(col.create_index, [("created_at", DESCENDING)])
        self._call(
            col.create_index,
            [("idempotency_key", ASCENDING)],
            unique=True,
            partialFilterExpression={"idempotency_key": {"$type": "string"}},
        )
        self._call(col.create_index, [("expire_at", ASCENDING)], expireAfterSeconds=0)
        self._call(
            col.create_index, [("webhook.state", ASCENDING), ("webhook.next_attempt_at", ASCENDING)]
        )

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._lock:
                return fn(*args, **kwargs)
        except self._duplicate:
            raise
        except self._errors as e:
            raise JobStoreError(f"job store operation failed: {e}") from e

    def transition(self, update: Update, *, upsert: bool = False) -> Document | None:
        """Apply one guarded ``(filter, update)``; the document after it, or None when the filter
        matched nothing (the guard did not hold)."""
        flt, upd = update
        try:
            doc = self._call(
                self.collection.find_one_and_update,
                flt,
                upd,
                upsert=upsert,
                return_document=ReturnDocument.AFTER,
            )
        except self._duplicate:
            return None  # the document exists in a status this transition may not leave
        return to_record(doc) if doc else None

    def _id_for_key(self, spec: JobSpec) -> str | None:
        """The job an idempotency key already names, or None; ``IdempotencyConflict`` when that
        job was submitted with another body."""
        if spec.idempotency_key is None:
            return None
        existing = self._call(
            self.collection.find_one,
            {"idempotency_key": spec.idempotency_key},
            {"_id": 1, "idempotency_hash": 1},
        )
        if existing is None:
            return None
        known = existing.get("idempotency_hash")
        if known is not None and known != spec.body_hash():
            raise IdempotencyConflict(
                f"idempotency_key {spec.idempotency_key!r} was used for job {existing['_id']} "
                "with a different body"
            )
        return str(existing["_id"])

    def insert(self, spec: JobSpec, now: dt.datetime | None = None) -> tuple[str, bool]:
        """Insert a queued job; returns (id, created). A known idempotency key returns the job
        that key already names, with ``created`` False, when the body is the same, and raises
        ``IdempotencyConflict`` when it is not."""
        if (known := self._id_for_key(spec)) is not None:
            return known, False
        try:
            self._call(self.collection.insert_one, queued_document(spec, now or utcnow()))
        except self._duplicate as e:
            # a concurrent submit with the same key won the unique index
            if (known := self._id_for_key(spec)) is not None:
                return known, False
            raise JobStoreError(f"job id {spec.id!r} already exists") from e
        return spec.id, True

    def get(self, job_id: str) -> Document | None:
        """The job's document, or None."""
        doc = self._call(self.collection.find_one, {"_id": job_id})
        return to_record(doc) if doc else None

    def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        model: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
    ) -> list[Document]:
        """Jobs, newest first, filtered by status, model and creation time."""
        query: Document = {}
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query["status"] = {"$in": statuses}
        if model is not None:
            query["model"] = model
        created: Document = {}
        if since is not None:
            created["$gte"] = self.query_time(since)
        if until is not None:
            created["$lt"] = self.query_time(until)
        if created:
            query["created_at"] = created
        return self.find(query, sort="created_at", limit=limit, descending=True)

    def find(
        self, query: Mapping[str, Any], *, sort: str, limit: int, descending: bool = False
    ) -> Documents:
        """Documents matching a raw query, ordered by ``sort`` (for the webhook outbox and
        listings beyond ``list``)."""
        cursor = self._call(self.collection.find, dict(query))
        order = DESCENDING if descending else ASCENDING
        docs = self._call(lambda: list(cursor.sort(sort, order).limit(limit)))
        return [to_record(d) for d in docs]

    def start(
        self,
        job_id: str,
        worker: str,
        *,
        spec_doc: Mapping[str, Any] | None = None,
        enqueued_at: dt.datetime | None = None,
        now: dt.datetime | None = None,
        model_id: str | None = None,
    ) -> Document | None:
        """Mark processing (creating the document if the producer did not); None if the job is
        already finished or cancelled. ``model_id``: the catalog id its model resolved to."""
        update = start_update(
            job_id,
            worker,
            now or utcnow(),
            spec_doc=spec_doc,
            enqueued_at=enqueued_at,
            model_id=model_id,
        )
        return self.transition(update, upsert=True)

    def complete(
        self,
        job_id: str,
        result: Any,
        metrics: Mapping[str, Any],
        now: dt.datetime | None = None,
        *,
        max_inline_bytes: int | None = None,
        webhook: Mapping[str, Any] | None = None,
    ) -> Document | None:
        """Mark completed with its result (and the pending ``webhook`` delivery, if any); None if
        the job was not processing. A result whose JSON exceeds ``max_inline_bytes`` goes to the
        blob store and the record references it."""
        now = now or utcnow()
        ref = None
        if max_inline_bytes is not None and self.blobs is not None:
            data = json.dumps(result, separators=(",", ":")).encode()
            if len(data) > max_inline_bytes:
                blob_id = self._call(
                    self.blobs.put,
                    job_id,
                    "result.json",
                    data,
                    content_type="application/json",
                    expire_at=now + self.retention,
                )
                result, ref = None, blob_ref(blob_id, data, "application/json")
        return self.transition(
            complete_update(
                job_id, result, metrics, now, self.retention, result_ref=ref, webhook=webhook
            )
        )

    def result(self, job_id: str) -> Any:
        """A completed job's result, read from the blob store when it was too large to inline."""
        doc = self.get(job_id)
        if doc is None:
            raise JobStoreError(f"no job {job_id!r}")
        ref = doc.get("result_ref")
        if ref and self.blobs is not None:
            return json.loads(self.blobs.get(ref["blob_id"]))
        return doc.get("result")

    def fail(
        self,
        job_id: str,
        error: Mapping[str, Any],
        *,
        spec_doc: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        webhook: Mapping[str, Any] | None = None,
        now: dt.datetime | None = None,
    ) -> Document | None:
        """Mark failed with ``error {code, message}`` (and the pending ``webhook`` delivery);
        None if the job had already finished."""
        update = fail_update(
            job_id,
            error,
            now or utcnow(),
            self.retention,
            spec_doc=spec_doc,
            metrics=metrics,
            webhook=webhook,
        )
        return self.transition(update, upsert=True)

    def cancel(
        self,
        job_id: str,
        now: dt.datetime | None = None,
        *,
        webhook: Mapping[str, Any] | None = None,
        running: bool = False,
    ) -> Document | None:
        """Cancel a job still queued (or, with ``running``, one its worker stopped), recording
        the pending ``webhook`` delivery; None if it was not in that status."""
        update = cancel_update(
            job_id, now or utcnow(), self.retention, webhook=webhook, running=running
        )
        return self.transition(update)
