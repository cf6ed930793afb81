"""The webhook outbox: a pending delivery recorded inside the job document, in the same update
that finishes the job, and the RQ jobs that carry out its attempts.

A job document's ``webhook`` field, once the job is finished::

    url, secret?        as submitted (secret is the name of a configured secret)
    id, event           webhook-id (the same on every attempt) and event type
    state               pending | delivered | failed
    attempts            [{n, at, duration_ms, status_code? | error?, response?, retry_after_s?}]
    next_attempt        number of the next attempt (1-based); round_start: first of this round
    next_attempt_at     when it is due
    claim_until         set while an attempt is in flight
    delivered_at | failed_at, error {code, message}

Attempt ``n`` of job ``J`` runs as the RQ job ``whk-J-n`` on the webhook queue, enqueued with
``unique=True``, so an attempt is queued at most once. Every change to ``webhook`` is one
``find_one_and_update`` guarded on ``state`` and ``next_attempt``, so a duplicate or late attempt
cannot record twice. The update builders are pure; ``Outbox`` applies them and talks to Redis.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import DuplicateJobError
from rq.job import JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from mlx_fusion import defaults
from mlx_fusion.config import Settings
from mlx_fusion.errors import WebhookDeliveryError
from mlx_fusion.jobs.store import Document, JobStore, Update, utcnow
from mlx_fusion.webhooks.events import event_id, event_type
from mlx_fusion.worker import fetch_rq_job

log = structlog.get_logger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
"""Delivery states."""

_RQ_ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED})


def pending_delivery(
    webhook: Mapping[str, Any] | None, job_id: str, status: str, now: dt.datetime
) -> Document | None:
    """The ``webhook`` field that records a pending delivery for a job finishing in ``status``;
    None when the job has no webhook."""
    if not webhook or not webhook.get("url"):
        return None
    etype = event_type(status)
    out: Document = {"url": str(webhook["url"])}
    if webhook.get("secret"):
        out["secret"] = str(webhook["secret"])
    out.update(
        id=event_id(job_id, etype),
        event=etype,
        state=PENDING,
        attempts=[],
        next_attempt=1,
        round_start=1,
        next_attempt_at=now,
        claim_until=None,
    )
    return out


def rq_job_id(job_id: str, attempt: int) -> str:
    """The RQ job id of attempt ``attempt`` of job ``job_id``'s delivery."""
    return f"whk-{job_id}-{attempt}"


def _unclaimed(now: dt.datetime) -> list[Document]:
    return [{"webhook.claim_until": None}, {"webhook.claim_until": {"$lt": now}}]


def claim_update(job_id: str, attempt: int, now: dt.datetime, until: dt.datetime) -> Update:
    """Take attempt ``attempt`` of a pending delivery, unless another attempt holds it."""
    return (
        {
            "_id": job_id,
            "webhook.state": PENDING,
            "webhook.next_attempt": attempt,
            "$or": _unclaimed(now),
        },
        {"$set": {"webhook.claim_until": until}},
    )


def record_update(
    job_id: str,
    attempt: Mapping[str, Any],
    state: str,
    now: dt.datetime,
    *,
    next_attempt_at: dt.datetime | None = None,
    error: Mapping[str, Any] | None = None,
) -> Update:
    """Record attempt ``attempt["n"]`` and the state it leaves the delivery in: ``delivered``,
    ``failed`` (with ``error``) or ``pending`` again (due at ``next_attempt_at``)."""
    n = int(attempt["n"])
    sets: Document = {"webhook.next_attempt": n + 1, "webhook.claim_until": None}
    if state == DELIVERED:
        sets.update({"webhook.state": DELIVERED, "webhook.delivered_at": now})
    elif state == FAILED:
        sets.update({"webhook.state": FAILED, "webhook.failed_at": now, "webhook.error": error})
    else:
        sets["webhook.next_attempt_at"] = next_attempt_at or now
    return (
        {"_id": job_id, "webhook.state": PENDING, "webhook.next_attempt": n},
        {"$push": {"webhook.attempts": dict(attempt)}, "$set": sets},
    )


def replay_update(job_id: str, next_attempt: int, now: dt.datetime) -> Update:
    """Start a new round of attempts for a delivery that is no longer pending."""
    return (
        {
            "_id": job_id,
            "webhook.state": {"$in": [FAILED, DELIVERED]},
            "webhook.next_attempt": next_attempt,
        },
        {
            "$set": {
                "webhook.state": PENDING,
                "webhook.round_start": next_attempt,
                "webhook.next_attempt_at": now,
                "webhook.claim_until": None,
                "webhook.error": None,
            }
        },
    )


def due_time(now: dt.datetime, delay_s: float) -> dt.datetime:
    """When an attempt ``delay_s`` after ``now`` is due, rounded up to a whole second (RQ's
    scheduler keeps whole seconds; rounding down would run it early)."""
    when = now.timestamp() + max(0.0, delay_s)
    return dt.datetime.fromtimestamp(math.ceil(when), tz=dt.UTC)


class Outbox:
    """Pending deliveries: queue their attempts, find the lost ones, replay the failed ones."""

    def __init__(self, settings: Settings, store: JobStore, connection: Redis) -> None:
        self.settings = settings
        self.store = store
        self.connection = connection
        self.queue = Queue(
            settings.webhook_queue_name(), connection=connection, serializer=JSONSerializer
        )

    def attempt_timeout_s(self) -> int:
        """RQ's hard limit on one attempt job (the HTTP timeouts end it sooner)."""
        return math.ceil(self.settings.webhook_timeout_s) + 5

    def enqueue(self, job_id: str, attempt: int, at: dt.datetime | None = None) -> bool:
        """Queue attempt ``attempt`` now or at ``at``; False when that attempt is already queued
        or scheduled (an RQ job with its id exists)."""
        options: dict[str, Any] = {
            "job_id": rq_job_id(job_id, attempt),
            "job_timeout": self.attempt_timeout_s(),
            "result_ttl": 0,
            "failure_ttl": defaults.WEBHOOK_FAILED_ATTEMPT_TTL_S,
            "description": f"webhook {job_id} attempt {attempt}",
            "unique": True,
        }
        try:
            if at is None:
                self.queue.enqueue(defaults.WEBHOOK_FUNCTION, job_id, attempt, **options)
            else:
                self.queue.enqueue_at(at, defaults.WEBHOOK_FUNCTION, job_id, attempt, **options)
        except DuplicateJobError:
            return False
        return True

    def notify(self, record: Mapping[str, Any]) -> bool:
        """Queue the next attempt of a just-finished job's pending delivery, if it has one. A
        Redis error is logged, not raised: the reconciler queues what this could not."""
        webhook = record.get("webhook")
        if not isinstance(webhook, Mapping) or webhook.get("state") != PENDING:
            return False
        try:
            return self.enqueue(str(record["id"]), int(webhook["next_attempt"]))
        except RedisError as e:
            log.warning("webhook_enqueue_failed", job_id=record.get("id"), error=str(e))
            return False

    def reconcile(self, now: dt.datetime | None = None, *, limit: int = 500) -> int:
        """Queue the attempts of pending deliveries that are overdue by more than the grace time
        with no RQ job queued or scheduled for them (a worker died between finishing a job and
        queuing its delivery, or during an attempt); returns how many were queued."""
        now = now or utcnow()
        overdue = self.store.query_time(
            now - dt.timedelta(seconds=self.settings.webhook_reconcile_grace_s)
        )
        query = {
            "webhook.state": PENDING,
            "webhook.next_attempt_at": {"$lte": overdue},
            "$or": _unclaimed(self.store.query_time(now)),
        }
        queued = 0
        for record in self.store.find(query, sort="webhook.next_attempt_at", limit=limit):
            job_id, webhook = str(record["id"]), record["webhook"]
            attempt = int(webhook["next_attempt"])
            rq_job = fetch_rq_job(self.connection, rq_job_id(job_id, attempt))
            status = rq_job.get_status(refresh=False) if rq_job is not None else None
            if status in _RQ_ACTIVE:
                continue
            if status == JobStatus.STARTED and webhook.get("claim_until") is None:
                continue  # dequeued a moment ago and not yet claimed
            if rq_job is not None:
                rq_job.delete()  # a finished, failed or abandoned run of this attempt
            if self.enqueue(job_id, attempt):
                queued += 1
                log.info("webhook_reconciled", job_id=job_id, attempt=attempt, rq_status=status)
        return queued

    def replay(self, job_id: str, now: dt.datetime | None = None) -> Document:
        """Deliver a finished job's webhook again (a new round of attempts with the same
        webhook-id); ``WebhookDeliveryError`` when it has none or one is still pending."""
        record = self.store.get(job_id)
        if record is None:
            raise WebhookDeliveryError(f"no job {job_id!r}")
        webhook = record.get("webhook")
        if not isinstance(webhook, Mapping) or "state" not in webhook:
            raise WebhookDeliveryError(f"job {job_id!r} has no webhook delivery to replay")
        if webhook["state"] == PENDING:
            raise WebhookDeliveryError(f"job {job_id!r}: its webhook delivery is still pending")
        attempt = int(webhook["next_attempt"])
        done = self.store.transition(replay_update(job_id, attempt, now or utcnow()))
        if done is None:
            raise WebhookDeliveryError(f"job {job_id!r}: its webhook delivery changed; try again")
        self.enqueue(job_id, attempt)
        log.info("webhook_replayed", job_id=job_id, attempt=attempt)
        return done

    def failed(self, limit: int = 100) -> list[Document]:
        """Jobs whose webhook delivery ended ``failed``, latest failure first."""
        return self.store.find(
            {"webhook.state": FAILED}, sort="webhook.failed_at", descending=True, limit=limit
        )
