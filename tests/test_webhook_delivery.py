"""Webhook delivery end to end in one process: a real GPU worker (its model replaced by a
stand-in kind) finishes jobs on a real Redis, a real webhook worker (RQ, its scheduler in burst
mode) delivers them to real HTTP receivers on 127.0.0.1 with a schedule shortened by settings.

Every test runs under a socket guard that fails any connection to a non-loopback address.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import slow_kind
import standardwebhooks
from conftest import TINY_MODEL, build_worker
from pydantic import SecretStr
from redis import Redis
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from webhook_helpers import (
    FakeResolver,
    NoConnectTransport,
    Reply,
    guard_sockets,
    http_receiver,
)

from mlx_fusion.config import Settings
from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.jobs.store import JobStore
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.webhooks import verify
from mlx_fusion.webhooks.delivery import Deliverer
from mlx_fusion.webhooks.outbox import Outbox, rq_job_id
from mlx_fusion.webhooks.signing import WebhookVerificationError, generate_secret
from mlx_fusion.webhooks.worker import WebhookWorker

SECRET = generate_secret()
OLD_SECRET = generate_secret()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return guard_sockets(monkeypatch)


class Hooks:
    """The GPU worker, the webhook worker and a client, on one Redis and one store."""

    def __init__(self, settings: Settings, redis: Redis, store: JobStore) -> None:
        from mlx_fusion.client import Client

        self.settings = settings
        self.redis = redis
        self.store = store
        self.client = Client(settings, redis, store)
        self.outbox = Outbox(settings, store, redis)
        self.deliverer = Deliverer(settings, self.outbox)

    def use(self, **kwargs: Any) -> None:
        """Deliver through another transport or resolver (the network boundary)."""
        self.deliverer = Deliverer(self.settings, self.outbox, **kwargs)

    def submit(self, url: str, **fields: Any) -> str:
        doc = {
            "kind": "completion",
            "model": TINY_MODEL,
            "input": {"prompt": "hi"},
            "webhook": {"url": url},
            **fields,
        }
        job_id: str = self.client.submit(doc)
        return job_id

    def run_jobs(self, notify: Callable[[dict[str, Any]], Any] | None = None) -> None:
        worker = build_worker(self.settings, self.redis, self.store, {ModelKind.LM: slow_kind})
        if notify is not None:
            worker.runner.notify = notify
        worker.work(burst=True)

    def deliver_once(self) -> None:
        worker = WebhookWorker(
            settings=self.settings, connection=self.redis, deliverer=self.deliverer
        )
        worker.work(burst=True, with_scheduler=True)

    def deliver_until(self, done: Callable[[], bool], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.deliver_once()
            if done():
                return
            assert time.monotonic() < deadline, "deliveries did not settle in time"
            time.sleep(0.05)

    def webhook(self, job_id: str) -> dict[str, Any]:
        record = self.store.get(job_id)
        assert record is not None
        webhook: dict[str, Any] = record["webhook"]
        return webhook

    def settle(self, job_id: str, timeout_s: float = 20) -> dict[str, Any]:
        self.deliver_until(lambda: self.webhook(job_id)["state"] != "pending", timeout_s)
        return self.webhook(job_id)


def hook_settings(settings: Settings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secrets": [SecretStr(SECRET)],
        "webhook_allow": ["127.0.0.0/8"],
        "webhook_schedule_s": [0.2, 0.2],
        "webhook_jitter": 0.0,
        "webhook_timeout_s": 1.0,
        "webhook_reconcile_grace_s": 0.2,
        **overrides,
    }
    return settings.model_copy(update=values)


@pytest.fixture
def hooks(settings: Settings, redis: Redis, store: JobStore) -> Hooks:
    return Hooks(hook_settings(settings), redis, store)


def make_hooks(settings: Settings, redis: Redis, store: JobStore, **overrides: Any) -> Hooks:
    return Hooks(hook_settings(settings, **overrides), redis, store)


# --- a delivery that works -----------------------------------------------------------------


def test_completed_job_webhook_arrives_once_with_valid_signatures(hooks: Hooks) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url, metadata={"team": "a"})
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
        for _ in range(3):  # more rounds of the webhook worker send nothing more
            hooks.deliver_once()
        assert len(receiver.received) == 1
    request = receiver.received[0]
    verify(request.body, request.headers, SECRET)
    standardwebhooks.Webhook(SECRET).verify(request.body, request.headers)
    event = json.loads(request.body)
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == job_id and event["data"]["status"] == "completed"
    assert event["data"]["metadata"] == {"team": "a"}
    assert event["data"]["result"]["object"] == "text_completion"
    assert request.headers["webhook-id"] == webhook["id"]
    assert request.headers["content-type"] == "application/json"
    assert webhook["state"] == "delivered" and webhook["delivered_at"] is not None
    assert [a["status_code"] for a in webhook["attempts"]] == [204]
    with pytest.raises(WebhookVerificationError):
        verify(request.body.replace(b"completed", b"failed"), request.headers, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify(request.body, request.headers, SECRET, now=time.time() + 3600)


def test_rotation_signs_with_both_secrets(
    settings: Settings, redis: Redis, store: JobStore
) -> None:
    hooks = make_hooks(
        settings, redis, store, webhook_secrets=[SecretStr(OLD_SECRET), SecretStr(SECRET)]
    )
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        assert hooks.settle(job_id)["state"] == "delivered"
    request = receiver.received[0]
    assert len(request.headers["webhook-signature"].split()) == 2
    verify(request.body, request.headers, OLD_SECRET)
    verify(request.body, request.headers, SECRET)


def test_job_names_its_secret_and_the_document_keeps_only_the_name(
    settings: Settings, redis: Redis, store: JobStore
) -> None:
    other = generate_secret()
    hooks = make_hooks(settings, redis, store, webhook_named_secrets={"tier2": [SecretStr(other)]})
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url, webhook={"url": receiver.url, "secret": "tier2"})
        hooks.run_jobs()
        assert hooks.settle(job_id)["state"] == "delivered"
    request = receiver.received[0]
    verify(request.body, request.headers, other)
    with pytest.raises(WebhookVerificationError):
        verify(request.body, request.headers, SECRET)
    assert other not in json.dumps(hooks.store.get(job_id), default=str)


def test_unknown_secret_name_fails_the_delivery_without_sending(hooks: Hooks) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url, webhook={"url": receiver.url, "secret": "nobody"})
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
    assert receiver.received == []
    assert webhook["state"] == "failed"
    assert webhook["error"]["code"] == "webhook_secret_unknown"
    assert "nobody" in webhook["error"]["message"]


def test_failed_job_sends_job_failed_with_its_error(hooks: Hooks) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url, model="no-such-model")
        hooks.run_jobs()
        assert hooks.settle(job_id)["state"] == "delivered"
    event = json.loads(receiver.received[0].body)
    assert event["type"] == "job.failed"
    assert event["data"]["error"]["code"] == "model_not_found"
    assert "result" not in event["data"]


def test_invalid_input_still_reports_to_its_webhook(hooks: Hooks, redis: Redis) -> None:
    with http_receiver() as receiver:
        job_id = "bad-input"
        document = {
            "id": job_id,
            "kind": "completion",
            "model": TINY_MODEL,
            "input": {"prompt": "hi", "temperature": -3},
            "webhook": {"url": receiver.url},
        }
        queue = Queue(
            hooks.settings.queue_name("default"), connection=redis, serializer=JSONSerializer
        )
        queue.enqueue_call(func=JOB_FUNCTION, args=(document,), job_id=job_id)
        hooks.run_jobs()
        assert hooks.settle(job_id)["state"] == "delivered"
    event = json.loads(receiver.received[0].body)
    assert event["type"] == "job.failed"
    assert event["data"]["error"]["code"] == "invalid_input"


def test_cancelled_job_sends_job_cancelled(hooks: Hooks) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url)
        assert hooks.client.cancel(job_id)
        assert hooks.settle(job_id)["state"] == "delivered"
    event = json.loads(receiver.received[0].body)
    assert event["type"] == "job.cancelled"
    assert event["data"]["status"] == "cancelled"


def test_result_over_the_webhook_limit_goes_by_reference(
    settings: Settings, redis: Redis, store: JobStore
) -> None:
    hooks = make_hooks(settings, redis, store, webhook_max_result_bytes=10)
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        hooks.settle(job_id)
    data = json.loads(receiver.received[0].body)["data"]
    assert "result" not in data
    assert data["result_ref"]["job_id"] == job_id and data["result_ref"]["bytes"] > 10


# --- retries -------------------------------------------------------------------------------


def test_500_500_200_is_three_attempts_spaced_by_the_schedule_with_one_id(
    settings: Settings, redis: Redis, store: JobStore
) -> None:
    hooks = make_hooks(settings, redis, store, webhook_schedule_s=[1.0, 2.0, 5.0])
    replies = [Reply(500, body=b"oops"), Reply(500), Reply(200)]
    with http_receiver(replies=replies) as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
    assert webhook["state"] == "delivered"
    assert [a["status_code"] for a in webhook["attempts"]] == [500, 500, 200]
    assert [a["n"] for a in webhook["attempts"]] == [1, 2, 3]
    assert webhook["attempts"][0]["response"] == "oops"
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert ids == {webhook["id"]}
    times = [r.at for r in receiver.received]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 1.0 <= gaps[0] < 4.5, gaps  # whole-second scheduling, plus a loaded machine
    assert 2.0 <= gaps[1] < 5.5, gaps
    for request in receiver.received:  # each attempt is signed afresh and verifies
        verify(request.body, request.headers, SECRET)


def test_receiver_down_exhausts_the_schedule_then_replay_delivers(
    hooks: Hooks, free_port: int
) -> None:
    url = f"http://127.0.0.1:{free_port}/hook"
    job_id = hooks.submit(url)
    hooks.run_jobs()
    webhook = hooks.settle(job_id)
    assert webhook["state"] == "failed"
    assert [a["error"]["code"] for a in webhook["attempts"]] == ["connection_failed"] * 3
    assert webhook["error"]["code"] == "webhook_failed"
    assert [r["id"] for r in hooks.outbox.failed()] == [job_id]
    with http_receiver(port=free_port) as receiver:
        hooks.outbox.replay(job_id)
        webhook = hooks.settle(job_id)
    assert webhook["state"] == "delivered"
    assert len(receiver.received) == 1
    assert receiver.received[0].headers["webhook-id"] == webhook["id"]
    assert [a["n"] for a in webhook["attempts"]] == [1, 2, 3, 4]
    assert hooks.outbox.failed() == []


def test_slow_receiver_times_out_and_is_retried(hooks: Hooks) -> None:
    with http_receiver(replies=[Reply(200, delay_s=3.0)]) as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
    assert webhook["state"] == "failed"
    assert [a["error"]["code"] for a in webhook["attempts"]] == ["timeout"] * 3
    assert all(a["duration_ms"] < 2500 for a in webhook["attempts"])
    assert len(receiver.received) == 3


def test_redirect_is_a_failure_and_is_not_followed(hooks: Hooks) -> None:
    with http_receiver() as elsewhere:
        redirect = Reply(302, headers=(("Location", elsewhere.url),))
        with http_receiver(replies=[redirect]) as receiver:
            job_id = hooks.submit(receiver.url)
            hooks.run_jobs()
            webhook = hooks.settle(job_id)
    assert webhook["state"] == "failed"
    assert [a["status_code"] for a in webhook["attempts"]] == [302, 302, 302]
    assert len(receiver.received) == 3
    assert elsewhere.received == []


def test_gone_stops_after_one_attempt(hooks: Hooks) -> None:
    with http_receiver(replies=[Reply(410)]) as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
        hooks.deliver_once()
    assert webhook["state"] == "failed"
    assert webhook["error"]["code"] == "webhook_gone"
    assert [a["status_code"] for a in webhook["attempts"]] == [410]
    assert len(receiver.received) == 1


def test_retry_after_is_honoured(settings: Settings, redis: Redis, store: JobStore) -> None:
    hooks = make_hooks(settings, redis, store, webhook_schedule_s=[0.1])
    replies = [Reply(503, headers=(("Retry-After", "2"),)), Reply(204)]
    with http_receiver(replies=replies) as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
    assert webhook["state"] == "delivered"
    assert webhook["attempts"][0]["retry_after_s"] == 2
    first, second = receiver.received
    assert second.at - first.at >= 2.0


def test_endless_response_body_is_read_only_up_to_the_cap(hooks: Hooks) -> None:
    with http_receiver(replies=[Reply(200, endless=True)]) as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        webhook = hooks.settle(job_id)
    assert webhook["state"] == "delivered"
    assert webhook["attempts"][0]["duration_ms"] < 2000  # stopped at the cap, not the hard timeout
    assert len(webhook["attempts"][0]["response"]) <= 256
    assert len(receiver.received) == 1


def test_an_attempt_runs_once_even_if_queued_twice(hooks: Hooks) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        assert hooks.outbox.enqueue(job_id, 1) is False  # the worker queued it already
        assert hooks.deliverer.attempt(job_id, 1) == "delivered"
        assert hooks.deliverer.attempt(job_id, 1) == "skipped"
        hooks.deliver_once()
    assert len(receiver.received) == 1
    assert len(hooks.webhook(job_id)["attempts"]) == 1


def test_a_record_that_cannot_be_sent_fails_on_the_schedule_instead_of_looping(
    hooks: Hooks,
) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        # a record no event can be built from (no final status), as a bug or a hand edit makes
        hooks.store.collection.update_one({"_id": job_id}, {"$set": {"status": "processing"}})
        webhook = hooks.settle(job_id)
    assert receiver.received == []
    assert webhook["state"] == "failed"
    assert [a["error"]["code"] for a in webhook["attempts"]] == ["internal_error"] * 3


# --- nothing sent where it must not go -----------------------------------------------------

REFUSED = [
    "http://127.0.0.1:9/hook",
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:9/hook",
    "http://[::ffff:127.0.0.1]:9/hook",
    "http://metadata.test/hook",
    "http://rebind.test/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_non_public_targets_are_refused_without_a_connection(
    settings: Settings, redis: Redis, store: JobStore, url: str
) -> None:
    hooks = make_hooks(settings, redis, store, webhook_allow=[])
    transport = NoConnectTransport()
    resolver = FakeResolver(
        {"metadata.test": ["169.254.169.254"], "rebind.test": ["93.184.216.34", "10.1.2.3"]}
    )
    hooks.use(transport=transport, resolver=resolver)
    job_id = hooks.submit(url)
    hooks.run_jobs()
    webhook = hooks.settle(job_id)
    assert transport.requests == []
    assert webhook["state"] == "failed"
    assert webhook["error"]["code"] == "webhook_target_refused"
    assert len(webhook["attempts"]) == 1


def test_allow_listed_name_reaches_the_loopback_receiver(
    settings: Settings, redis: Redis, store: JobStore
) -> None:
    hooks = make_hooks(settings, redis, store, webhook_allow=["tier2.internal"])
    with http_receiver() as receiver:
        hooks.use(resolver=FakeResolver({"tier2.internal": ["127.0.0.1"]}))
        job_id = hooks.submit(f"http://tier2.internal:{receiver.port}/hook")
        hooks.run_jobs()
        assert hooks.settle(job_id)["state"] == "delivered"
    assert receiver.received[0].headers["host"] == f"tier2.internal:{receiver.port}"


# --- nothing lost --------------------------------------------------------------------------


def test_reconciler_queues_a_delivery_that_was_never_queued(hooks: Hooks) -> None:
    with http_receiver() as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs(notify=lambda record: None)  # as if the worker died before queuing
        assert hooks.webhook(job_id)["state"] == "pending"
        assert Queue(hooks.settings.webhook_queue_name(), connection=hooks.redis).count == 0
        time.sleep(0.3)  # past the grace time
        assert hooks.settle(job_id)["state"] == "delivered"
        hooks.deliver_once()
    assert len(receiver.received) == 1


def test_reconciler_leaves_queued_and_scheduled_attempts_alone(hooks: Hooks) -> None:
    with http_receiver(replies=[Reply(500)]) as receiver:
        job_id = hooks.submit(receiver.url)
        hooks.run_jobs()
        time.sleep(0.3)
        assert hooks.outbox.reconcile() == 0  # attempt 1 is queued
        hooks.deliverer.attempt(job_id, 1)
        scheduled = ScheduledJobRegistry(
            hooks.settings.webhook_queue_name(), connection=hooks.redis, serializer=JSONSerializer
        )
        assert rq_job_id(job_id, 2) in scheduled.get_job_ids()
        time.sleep(1.5)  # attempt 2 is overdue but still scheduled (no scheduler ran)
        assert hooks.outbox.reconcile() == 0
    assert len(receiver.received) == 1
