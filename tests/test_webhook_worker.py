"""The webhook worker as operators run it: ``mlx-fusion webhook-worker`` and ``mlx-fusion
scheduler`` as processes, GPU workers killed at the worst moment, receivers that hang, and the
``webhooks`` commands. The store is the embedded one (montydb in the data dir), shared by the
processes; Redis is the session's real redis-server; receivers listen on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import slow_kind
from conftest import (
    REPO,
    TINY_MODEL,
    build_worker,
    fusion_env,
    run_python,
    settings_from_env,
    stop_process,
    unused_port,
    wait_for,
)
from redis import Redis
from rq import Queue, Worker
from webhook_helpers import Reply, http_receiver

from mlx_fusion.client import Client
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.jobs.document import JobSpec
from mlx_fusion.jobs.store import JobStore, utcnow
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.webhooks.outbox import pending_delivery, record_update
from mlx_fusion.webhooks.signing import generate_secret, verify

SECRET = generate_secret()


def webhook_env(tmp_path: Path, redis_url: str, catalog: Path, **extra: str) -> dict[str, str]:
    return fusion_env(
        tmp_path,
        redis_url,
        catalog,
        FUSION_WEBHOOK_SECRETS=SECRET,
        FUSION_WEBHOOK_ALLOW="127.0.0.0/8",
        FUSION_WEBHOOK_SCHEDULE_S="1,1",
        FUSION_WEBHOOK_JITTER="0",
        FUSION_WEBHOOK_TIMEOUT_S="2",
        FUSION_WEBHOOK_RECONCILE_INTERVAL_S="1",
        FUSION_WEBHOOK_RECONCILE_GRACE_S="0.5",
        **extra,
    )


@pytest.fixture
def env(tmp_path: Path, redis_url: str, catalog_path: Path, redis: Redis) -> dict[str, str]:
    return webhook_env(tmp_path, redis_url, catalog_path)


@pytest.fixture
def shared_store(env: dict[str, str]) -> JobStore:
    return connect_store(settings_from_env(env))


def chat(url: str) -> dict[str, Any]:
    return {
        "kind": "completion",
        "model": TINY_MODEL,
        "input": {"prompt": "hi"},
        "webhook": {"url": url},
    }


@pytest.fixture
def start_process(env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``python -m mlx_fusion ARGS`` with the test's environment; stopped at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_fusion", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_process(proc)


KILLED_BEFORE_ENQUEUE = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO / "tests")!r})
import slow_kind
from conftest import build_worker
from redis import Redis
from mlx_fusion.config import Settings
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.jobs.document import JobSpec
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.webhooks.outbox import Outbox

def die(self, record):  # the job is finished in the store; its delivery is not queued yet
    os.kill(os.getpid(), signal.SIGKILL)

Outbox.notify = die
settings = Settings()
redis = Redis.from_url(settings.redis_url)
build_worker(settings, redis, connect_store(settings), {{ModelKind.LM: slow_kind}}).work(burst=True)
"""


def test_worker_killed_before_queuing_the_delivery_is_delivered_once_by_the_reconciler(
    env: dict[str, str],
    shared_store: JobStore,
    redis: Redis,
    start_process: Callable[..., subprocess.Popen[str]],
) -> None:
    settings = settings_from_env(env)
    with http_receiver() as receiver:
        job_id = Client(settings, redis, shared_store).submit(chat(receiver.url))
        killed = run_python(env, "-c", KILLED_BEFORE_ENQUEUE)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        record = shared_store.get(job_id)
        assert record is not None and record["status"] == "completed"
        assert record["webhook"]["state"] == "pending"
        assert Queue(settings.webhook_queue_name(), connection=redis).count == 0

        start_process("webhook-worker")
        wait_for(lambda: len(receiver.received) >= 1, 60, "the reconciled delivery")
        time.sleep(3)  # several more reconcile rounds
        assert len(receiver.received) == 1
    webhook = shared_store.get(job_id)["webhook"]  # type: ignore[index]
    assert webhook["state"] == "delivered"
    assert len(webhook["attempts"]) == 1
    request = receiver.received[0]
    verify(request.body, request.headers, SECRET)
    assert json.loads(request.body)["data"]["id"] == job_id


def test_hanging_receiver_does_not_slow_the_gpu_worker(
    env: dict[str, str],
    shared_store: JobStore,
    redis: Redis,
    start_process: Callable[..., subprocess.Popen[str]],
) -> None:
    hang_s = 30
    env["FUSION_WEBHOOK_TIMEOUT_S"] = str(hang_s)
    settings = settings_from_env(env)
    client = Client(settings, redis, shared_store)
    gpu = build_worker(settings, redis, shared_store, {ModelKind.LM: slow_kind})
    with http_receiver(replies=[Reply(hang=True)]) as receiver:
        start_process("webhook-worker")
        first = client.submit(chat(receiver.url))
        gpu.work(burst=True)
        wait_for(lambda: len(receiver.received) == 1, 60, "a delivery to hang")
        started = time.monotonic()
        ids = [client.submit(chat(receiver.url)) for _ in range(10)]
        build_worker(settings, redis, shared_store, {ModelKind.LM: slow_kind}).work(burst=True)
        elapsed = time.monotonic() - started
        statuses = {shared_store.get(i)["status"] for i in ids}  # type: ignore[index]
        # every job finished while the first delivery was still hanging
        assert statuses == {"completed"}
        assert receiver.answered == 0 and len(receiver.received) == 1
        assert elapsed < hang_s
        pending = [shared_store.get(i)["webhook"]["state"] for i in [first, *ids]]  # type: ignore[index]
        assert set(pending) == {"pending"}


def test_worker_processes_deliver_side_by_side(
    env: dict[str, str],
    shared_store: JobStore,
    redis: Redis,
    start_process: Callable[..., subprocess.Popen[str]],
) -> None:
    env["FUSION_WEBHOOK_TIMEOUT_S"] = "20"
    settings = settings_from_env(env)
    client = Client(settings, redis, shared_store)
    webhook_queue = Queue(settings.webhook_queue_name(), connection=redis)
    with http_receiver(replies=[Reply(204, delay_s=4.0)]) as receiver:
        start_process("webhook-worker", "--processes", "3")
        wait_for(lambda: len(Worker.all(queue=webhook_queue)) == 3, 60, "three worker processes")
        ids = [client.submit(chat(receiver.url)) for _ in range(3)]
        build_worker(settings, redis, shared_store, {ModelKind.LM: slow_kind}).work(burst=True)
        wait_for(lambda: len(receiver.received) == 3, 60, "three deliveries")
        assert receiver.answered == 0  # all three were in flight at once
        wait_for(
            lambda: all(
                shared_store.get(i)["webhook"]["state"] == "delivered"  # type: ignore[index]
                for i in ids
            ),
            60,
            "the deliveries to be recorded",
        )
    assert len(receiver.received) == 3


def test_scheduler_process_moves_retries_for_a_worker_without_one(
    shared_store: JobStore,
    env: dict[str, str],
    redis: Redis,
    start_process: Callable[..., subprocess.Popen[str]],
) -> None:
    settings = settings_from_env(env)
    with http_receiver(replies=[Reply(500), Reply(204)]) as receiver:
        job_id = Client(settings, redis, shared_store).submit(chat(receiver.url))
        build_worker(settings, redis, shared_store, {ModelKind.LM: slow_kind}).work(burst=True)
        start_process("webhook-worker", "--no-scheduler")
        wait_for(lambda: len(receiver.received) == 1, 60, "the first attempt")
        time.sleep(2.5)  # the retry is due, but nothing moves it
        assert len(receiver.received) == 1
        start_process("scheduler")
        wait_for(lambda: len(receiver.received) == 2, 60, "the retry")
    wait_for(
        lambda: shared_store.get(job_id)["webhook"]["state"] == "delivered",  # type: ignore[index]
        30,
        "the delivery to be recorded",
    )


def test_webhook_worker_refuses_to_start_without_a_secret(env: dict[str, str]) -> None:
    env.pop("FUSION_WEBHOOK_SECRETS")
    done = run_python(env, "-m", "mlx_fusion", "webhook-worker", "--burst", timeout_s=60)
    assert done.returncode == 2
    assert "FUSION_WEBHOOK_SECRETS" in done.stderr


def test_webhook_worker_never_imports_mlx(env: dict[str, str], shared_store: JobStore) -> None:
    script = (
        "import sys\n"
        "from mlx_fusion.cli import app\n"
        "try:\n"
        "    app(['webhook-worker', '--burst', '--no-scheduler'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'torch')))\n"
        "print('mlx_fusion.registry' in sys.modules)\n"
    )
    done = run_python(env, "-c", script, timeout_s=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[]", "False"]


def failed_delivery(store: JobStore, job_id: str) -> None:
    spec = JobSpec(id=job_id, kind="completion", model="m", input={"prompt": "x"})
    store.insert(spec)
    store.start(job_id, "w")
    now = utcnow()
    webhook = pending_delivery({"url": "http://127.0.0.1:9/"}, job_id, "completed", now)
    store.complete(job_id, {"ok": 1}, {}, webhook=webhook)
    attempt = {"n": 1, "at": now, "duration_ms": 1.0, "status_code": 410}
    error = {"code": "webhook_gone", "message": "receiver answered 410 Gone; not retried"}
    assert store.transition(record_update(job_id, attempt, "failed", now, error=error))


def test_webhooks_failed_lists_and_replay_requeues(
    env: dict[str, str], shared_store: JobStore, redis: Redis
) -> None:
    failed_delivery(shared_store, "gone-1")
    listed = run_python(env, "-m", "mlx_fusion", "webhooks", "failed", "--json", timeout_s=60)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["attempts"], r["error"]["code"]) for r in rows] == [
        ("gone-1", 1, "webhook_gone")
    ]
    replayed = run_python(env, "-m", "mlx_fusion", "webhooks", "replay", "gone-1", timeout_s=60)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    settings = settings_from_env(env)
    assert Queue(settings.webhook_queue_name(), connection=redis).job_ids == ["whk-gone-1-2"]
    again = run_python(env, "-m", "mlx_fusion", "webhooks", "replay", "gone-1", timeout_s=60)
    assert again.returncode == 2 and "still pending" in again.stderr


def test_a_worker_pool_serves_the_delivery_metrics_of_all_its_processes(
    env: dict[str, str],
    shared_store: JobStore,
    redis: Redis,
    start_process: Callable[..., subprocess.Popen[str]],
) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    port = unused_port()
    env["FUSION_METRICS_PORT"] = str(port)
    settings = settings_from_env(env)
    client = Client(settings, redis, shared_store)
    webhook_queue = Queue(settings.webhook_queue_name(), connection=redis)
    with http_receiver(replies=[Reply(500), Reply(204)]) as receiver:
        start_process("webhook-worker", "--processes", "2")
        wait_for(lambda: len(Worker.all(queue=webhook_queue)) == 2, 60, "two worker processes")
        ids = [client.submit(chat(receiver.url)) for _ in range(2)]
        gpu_settings = settings.model_copy(update={"metrics_port": None})  # the port is taken
        build_worker(gpu_settings, redis, shared_store, {ModelKind.LM: slow_kind}).work(burst=True)
        wait_for(
            lambda: all(
                (shared_store.get(i) or {}).get("webhook", {}).get("state") == "delivered"
                for i in ids
            ),
            60,
            "both deliveries (one after a retry)",
        )
    assert len(receiver.received) == 3
    url = f"http://127.0.0.1:{port}"
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "worker"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("fusion_webhook_attempts_total", (("outcome", "delivered"),))] == 2
    assert samples[("fusion_webhook_attempts_total", (("outcome", "retry"),))] == 1
    assert samples[("fusion_webhook_deliveries_total", (("result", "delivered"),))] == 2
    assert samples[("fusion_webhook_attempt_seconds_count", ())] == 3
    assert samples[("fusion_queue_depth", (("queue", settings.webhook_queue_name()),))] == 0
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["healthy"] is True
