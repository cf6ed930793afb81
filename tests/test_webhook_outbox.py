"""The webhook outbox on every store backend, and the pure retry decisions.

The outbox's guarantees rest on single guarded updates of the job document: the pending delivery
is written with the final status, an attempt is claimed by one sender at a time and recorded once,
and a replay starts only from a delivery that is over. These run on mongomock, the embedded
montydb store and (with FUSION_TEST_MONGO_URL) a real MongoDB.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from redis import Redis

from mlx_fusion.config import Settings
from mlx_fusion.errors import WebhookDeliveryError
from mlx_fusion.jobs.document import JobSpec
from mlx_fusion.jobs.store import JobStore, utcnow
from mlx_fusion.webhooks.delivery import next_step, parse_retry_after, retry_delay_s
from mlx_fusion.webhooks.events import event_id
from mlx_fusion.webhooks.outbox import (
    Outbox,
    claim_update,
    due_time,
    pending_delivery,
    record_update,
)
from mlx_fusion.webhooks.signing import generate_secret

URL = "http://127.0.0.1:9/hook"


def queued(store: JobStore, job_id: str, **fields: Any) -> str:
    spec = JobSpec(
        id=job_id,
        kind="completion",
        model="m",
        input={"prompt": "x"},
        webhook={"url": URL, "secret": "tier2"},  # type: ignore[arg-type]
        **fields,
    )
    store.insert(spec)
    return job_id


def finished(store: JobStore, job_id: str) -> dict[str, Any]:
    queued(store, job_id)
    store.start(job_id, "w1")
    now = utcnow()
    webhook = pending_delivery({"url": URL, "secret": "tier2"}, job_id, "completed", now)
    record = store.complete(job_id, {"ok": True}, {"inference_ms": 1}, webhook=webhook)
    assert record is not None
    return record


def test_completion_writes_the_pending_delivery_with_the_status(any_store: JobStore) -> None:
    record = finished(any_store, "j1")
    assert record["status"] == "completed"
    webhook = record["webhook"]
    assert webhook["state"] == "pending" and webhook["event"] == "job.completed"
    assert webhook["id"] == event_id("j1", "job.completed")
    assert webhook["url"] == URL and webhook["secret"] == "tier2"
    assert webhook["attempts"] == [] and webhook["next_attempt"] == 1
    assert webhook["next_attempt_at"].tzinfo is not None


def test_failure_of_an_unknown_job_creates_it_with_its_pending_delivery(
    any_store: JobStore,
) -> None:
    webhook = pending_delivery({"url": URL}, "j2", "failed", utcnow())
    record = any_store.fail(
        "j2", {"code": "invalid_input", "message": "x"}, spec_doc={"kind": "x"}, webhook=webhook
    )
    assert record is not None
    assert record["webhook"]["event"] == "job.failed" and record["webhook"]["state"] == "pending"
    assert "secret" not in record["webhook"]


def test_cancel_writes_the_pending_delivery(any_store: JobStore) -> None:
    queued(any_store, "j3")
    webhook = pending_delivery({"url": URL}, "j3", "cancelled", utcnow())
    record = any_store.cancel("j3", webhook=webhook)
    assert record is not None and record["webhook"]["event"] == "job.cancelled"


def test_no_webhook_means_no_delivery() -> None:
    assert pending_delivery(None, "j", "completed", utcnow()) is None


def test_an_attempt_is_claimed_by_one_sender_until_its_claim_expires(any_store: JobStore) -> None:
    finished(any_store, "j4")
    now = utcnow()
    until = now + dt.timedelta(seconds=60)
    qt = any_store.query_time
    assert any_store.transition(claim_update("j4", 1, qt(now), until)) is not None
    assert any_store.transition(claim_update("j4", 1, qt(now), until)) is None
    assert any_store.transition(claim_update("j4", 2, qt(now), until)) is None  # not due
    later = now + dt.timedelta(seconds=61)
    assert any_store.transition(claim_update("j4", 1, qt(later), later)) is not None


def test_an_attempt_is_recorded_once(any_store: JobStore) -> None:
    finished(any_store, "j5")
    now = utcnow()
    attempt = {"n": 1, "at": now, "duration_ms": 3.0, "status_code": 500}
    due = now + dt.timedelta(seconds=5)
    record = any_store.transition(record_update("j5", attempt, "pending", now, next_attempt_at=due))
    assert record is not None
    webhook = record["webhook"]
    assert webhook["next_attempt"] == 2 and webhook["claim_until"] is None
    assert [a["status_code"] for a in webhook["attempts"]] == [500]
    assert any_store.transition(record_update("j5", attempt, "pending", now)) is None
    delivered = {"n": 2, "at": now, "duration_ms": 1.0, "status_code": 200}
    record = any_store.transition(record_update("j5", delivered, "delivered", now))
    assert record is not None and record["webhook"]["state"] == "delivered"
    assert len(record["webhook"]["attempts"]) == 2


def settings_for(any_store: JobStore, redis_url: str, **overrides: Any) -> Settings:
    return Settings(
        redis_url=redis_url,
        webhook_reconcile_grace_s=0,
        _env_file=None,  # type: ignore[call-arg]
        **overrides,
    )


def test_reconcile_finds_overdue_unqueued_deliveries_only(
    any_store: JobStore, redis: Redis, redis_url: str
) -> None:
    outbox = Outbox(settings_for(any_store, redis_url), any_store, redis)
    finished(any_store, "lost")
    finished(any_store, "queued")
    finished(any_store, "claimed")
    outbox.enqueue("queued", 1)
    now = utcnow()
    claim = claim_update("claimed", 1, any_store.query_time(now), now + dt.timedelta(minutes=1))
    assert any_store.transition(claim) is not None
    later = now + dt.timedelta(seconds=1)
    assert outbox.reconcile(later) == 1
    assert outbox.queue.job_ids == ["whk-queued-1", "whk-lost-1"]
    assert outbox.reconcile(later) == 0  # now it is queued


def test_replay_needs_a_delivery_that_is_over(
    any_store: JobStore, redis: Redis, redis_url: str
) -> None:
    outbox = Outbox(settings_for(any_store, redis_url), any_store, redis)
    finished(any_store, "r1")
    with pytest.raises(WebhookDeliveryError, match="still pending"):
        outbox.replay("r1")
    now = utcnow()
    attempt = {"n": 1, "at": now, "duration_ms": 1.0, "status_code": 410}
    error = {"code": "webhook_gone", "message": "gone"}
    any_store.transition(record_update("r1", attempt, "failed", now, error=error))
    assert [r["id"] for r in outbox.failed()] == ["r1"]
    record = outbox.replay("r1")
    webhook = record["webhook"]
    assert webhook["state"] == "pending" and webhook["round_start"] == 2
    assert webhook["error"] is None and len(webhook["attempts"]) == 1
    assert outbox.queue.job_ids == ["whk-r1-2"]
    assert outbox.failed() == []
    with pytest.raises(WebhookDeliveryError, match="no job"):
        outbox.replay("nope")


# --- pure decisions ------------------------------------------------------------------------


SCHEDULE = [5.0, 300.0]


def test_2xx_delivers() -> None:
    assert next_step({"status_code": 201}, 1, SCHEDULE, jitter=0).state == "delivered"


@pytest.mark.parametrize("status", [301, 302, 400, 404, 429, 500, 503])
def test_other_answers_retry_on_the_schedule(status: int) -> None:
    step = next_step({"status_code": status}, 2, SCHEDULE, jitter=0)
    assert step.state == "pending" and step.delay_s == 300.0


def test_the_schedule_gives_one_attempt_more_than_it_has_waits() -> None:
    step = next_step({"status_code": 500}, 3, SCHEDULE, jitter=0)
    assert step.state == "failed" and step.error is not None
    assert step.error["code"] == "webhook_failed" and "3 attempts" in step.error["message"]


def test_gone_fails_at_once() -> None:
    step = next_step({"status_code": 410}, 1, SCHEDULE, jitter=0)
    assert step.state == "failed" and step.error == {
        "code": "webhook_gone",
        "message": "receiver answered 410 Gone; not retried",
    }


def test_refused_target_fails_at_once() -> None:
    error = {"code": "webhook_target_refused", "message": "no"}
    step = next_step({"error": error}, 1, SCHEDULE, jitter=0)
    assert step.state == "failed" and step.error == error


def test_transport_errors_retry() -> None:
    step = next_step({"error": {"code": "timeout", "message": "t"}}, 1, SCHEDULE, jitter=0)
    assert step.state == "pending" and step.delay_s == 5.0


def test_retry_after_lengthens_a_wait_but_never_shortens_it() -> None:
    longer = next_step({"status_code": 503, "retry_after_s": 60}, 1, SCHEDULE, jitter=0)
    shorter = next_step({"status_code": 503, "retry_after_s": 1}, 1, SCHEDULE, jitter=0)
    capped = next_step(
        {"status_code": 503, "retry_after_s": 10**9}, 1, SCHEDULE, jitter=0, retry_after_max_s=99
    )
    assert (longer.delay_s, shorter.delay_s, capped.delay_s) == (60, 5.0, 99)


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 80.0), (0.5, 100.0), (1.0, 120.0)])
def test_jitter_stays_within_its_fraction(draw: float, expected: float) -> None:
    assert retry_delay_s([100.0], 0, 0.2, rng=lambda: draw) == pytest.approx(expected)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert parse_retry_after("30", now) == 30
    assert parse_retry_after(date, now) == pytest.approx(120)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_due_time_rounds_up_to_a_whole_second() -> None:
    now = dt.datetime(2026, 1, 1, 0, 0, 0, 300_000, tzinfo=dt.UTC)
    assert due_time(now, 1.0) == dt.datetime(2026, 1, 1, 0, 0, 2, tzinfo=dt.UTC)
    assert due_time(now, 0.7) == dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC)


# --- settings ------------------------------------------------------------------------------


def test_webhook_settings_read_lists_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = generate_secret(), generate_secret()
    monkeypatch.setenv("FUSION_WEBHOOK_SECRETS", f"{a},{b}")
    monkeypatch.setenv("FUSION_WEBHOOK_NAMED_SECRETS", f'{{"tier2": "{a}"}}')
    monkeypatch.setenv("FUSION_WEBHOOK_ALLOW", "10.0.0.0/8, tier2.internal")
    monkeypatch.setenv("FUSION_WEBHOOK_SCHEDULE_S", "1,2.5")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.webhook_signing_secrets(None) == [a, b]
    assert settings.webhook_signing_secrets("tier2") == [a]
    assert settings.webhook_allow == ["10.0.0.0/8", "tier2.internal"]
    assert settings.webhook_schedule_s == [1.0, 2.5]
    assert a not in repr(settings) and a not in str(settings.model_dump())


@pytest.mark.parametrize(
    "env",
    [
        {"FUSION_WEBHOOK_SECRETS": "whsec_not base64!"},
        {"FUSION_WEBHOOK_NAMED_SECRETS": '{"bad name": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}'},
        {"FUSION_WEBHOOK_SCHEDULE_S": "5,-1"},
    ],
)
def test_bad_webhook_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_unknown_secret_name_is_a_key_error() -> None:
    settings = Settings(
        webhook_secrets=[SecretStr(generate_secret())],
        _env_file=None,  # type: ignore[call-arg]
    )
    with pytest.raises(KeyError):
        settings.webhook_signing_secrets("tier2")
