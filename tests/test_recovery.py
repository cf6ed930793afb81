"""Jobs lost by dead workers or by Redis are found and run again, or failed with worker_lost.

The worker that dies is a real process killed with SIGKILL mid-job; the store is the embedded one
shared with it (montydb in the data dir); Redis is the session's redis-server.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import slow_kind
from conftest import (
    STAND_IN_WORKER,
    TINY_MODEL,
    build_worker,
    fusion_env,
    settings_from_env,
    wait_for,
)
from redis import Redis

from mlx_fusion.client import Client
from mlx_fusion.config import Settings
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.jobs.document import JobSpec
from mlx_fusion.jobs.store import JobStore, utcnow
from mlx_fusion.recovery import JobRecovery
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.worker import running_job_ids


@pytest.fixture
def env(tmp_path: Path, redis_url: str, catalog_path: Path, redis: Redis) -> dict[str, str]:
    return fusion_env(
        tmp_path,
        redis_url,
        catalog_path,
        FUSION_HEARTBEAT_INTERVAL_S="0.5",
        FUSION_RECOVERY_INTERVAL_S="1",
        FUSION_RECOVERY_GRACE_S="0",
    )


@pytest.fixture
def settings_(env: dict[str, str]) -> Settings:
    return settings_from_env(env)


@pytest.fixture
def shared_store(settings_: Settings) -> JobStore:
    return connect_store(settings_)


def job(sleep_s: float, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "completion",
        "model": TINY_MODEL,
        "input": {"prompt": "hi"},
        "metadata": {"sleep_s": str(sleep_s)},
        **fields,
    }


def test_job_of_a_killed_worker_runs_again_on_another(
    env: dict[str, str], settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    job_id = Client(settings_, redis, shared_store).submit(job(3))
    doomed = subprocess.Popen(
        [sys.executable, "-c", STAND_IN_WORKER], env=env, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: shared_store.get(job_id)["status"] == "processing", 60, "the job to start")  # type: ignore[index]
        recovery = JobRecovery(settings_, shared_store, redis)
        assert recovery.run() == {"requeued": 0, "failed": 0, "enqueued": 0, "skipped": 0}
        doomed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.wait(timeout=10)
    finally:
        doomed.kill()
    queues = settings_.queue_names()
    wait_for(lambda: job_id not in running_job_ids(redis, queues), 30, "the heartbeat to expire")
    noticed_s = time.monotonic() - killed_at
    print(f"recovery: the killed worker's job was noticed {noticed_s:.2f} s after SIGKILL")
    heartbeat_ttl_s = 6 * settings_.heartbeat_interval_s
    assert noticed_s <= heartbeat_ttl_s + 2.0, noticed_s
    assert shared_store.get(job_id)["status"] == "processing"  # type: ignore[index]

    build_worker(settings_, redis, shared_store, {ModelKind.LM: slow_kind}).work(burst=True)

    record = shared_store.get(job_id)
    assert record is not None and record["status"] == "completed", record
    assert record["attempts"] == 2 and record["recoveries"] == 1


def test_every_job_of_a_batch_whose_worker_was_killed_runs_again(
    env: dict[str, str], settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    long = [
        {
            "kind": "completion",
            "model": TINY_MODEL,
            "input": {"prompt": f"Count to {n}:", "max_tokens": 2000, "temperature": 0},
        }
        for n in range(4)
    ]
    ids = Client(settings_, redis, shared_store).submit_many(long)
    doomed = subprocess.Popen(
        [sys.executable, "-m", "mlx_fusion", "worker"], env=env, stderr=subprocess.DEVNULL
    )
    try:  # all four running at once: the leader and its three companions, in one batch
        wait_for(
            lambda: all(shared_store.get(i)["status"] == "processing" for i in ids),  # type: ignore[index]
            120,
            "the batch to start",
        )
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    finally:
        doomed.kill()
    queues = settings_.queue_names()
    wait_for(
        lambda: not set(ids) & set(running_job_ids(redis, queues)), 30, "the heartbeats to expire"
    )
    assert all(shared_store.get(i)["status"] == "processing" for i in ids)  # type: ignore[index]

    build_worker(settings_, redis, shared_store).work(burst=True)

    for job_id in ids:
        record = shared_store.get(job_id)
        assert record is not None and record["status"] == "completed", record
        assert record["attempts"] == 2 and record["recoveries"] == 1, record


def dead_worker_job(store: JobStore, job_id: str, **fields: Any) -> str:
    """A job as a worker that died mid-job leaves it: processing in the store, run by nobody."""
    spec = JobSpec.model_validate({"id": job_id, **job(0), **fields})
    store.insert(spec)
    assert store.start(job_id, "dead-worker") is not None
    return job_id


def test_job_on_its_last_attempt_fails_with_worker_lost(
    settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    settings = settings_.model_copy(update={"job_max_attempts": 1})
    webhook = {"url": "http://127.0.0.1:9/hook"}
    job_id = dead_worker_job(shared_store, "lost-1", webhook=webhook)
    counts = JobRecovery(settings, shared_store, redis).run()
    assert counts["failed"] == 1
    record = shared_store.get(job_id)
    assert record is not None and record["status"] == "failed"
    assert record["error"]["code"] == "worker_lost"
    assert "dead-worker" in record["error"]["message"]
    assert record["webhook"]["state"] == "pending" and record["webhook"]["event"] == "job.failed"


def test_two_recoveries_requeue_a_lost_job_once(
    settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    job_id = dead_worker_job(shared_store, "lost-2")
    first = JobRecovery(settings_, shared_store, redis)
    second = JobRecovery(settings_, shared_store, redis)
    assert first.run()["requeued"] == 1
    assert second.run() == {"requeued": 0, "failed": 0, "enqueued": 0, "skipped": 0}
    queue_ids = redis.lrange(f"rq:queue:{settings_.queue_name('default')}", 0, -1)
    assert queue_ids == [job_id.encode()]


def test_queued_record_whose_rq_job_is_gone_is_enqueued_and_runs(
    settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    client = Client(settings_, redis, shared_store)
    job_id = client.submit(job(0))
    redis.flushdb()  # Redis lost its data (restarted without persistence)
    build_worker(settings_, redis, shared_store, {ModelKind.LM: slow_kind}).work(burst=True)
    record = shared_store.get(job_id)
    assert record is not None and record["status"] == "completed"
    assert record["attempts"] == 1


def test_queued_job_still_on_its_queue_is_left_alone(
    settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    Client(settings_, redis, shared_store).submit(job(0))
    assert JobRecovery(settings_, shared_store, redis).run()["enqueued"] == 0


def test_a_record_that_cannot_be_rerun_does_not_stop_the_others(
    settings_: Settings, shared_store: JobStore, redis: Redis
) -> None:
    broken = {"_id": "broken", "status": "queued", "kind": "completion", "updated_at": utcnow()}
    broken["created_at"] = broken["updated_at"]
    shared_store.collection.insert_one(broken)  # no model, no input: no job document from it
    good = Client(settings_, redis, shared_store).submit(job(0))
    redis.flushdb()  # both lost their RQ job
    counts = JobRecovery(settings_, shared_store, redis).run()
    assert counts["enqueued"] == 1
    assert redis.lrange(f"rq:queue:{settings_.queue_name('default')}", 0, -1) == [good.encode()]


def test_a_job_whose_expired_execution_rq_still_lists_is_requeued(
    settings: Settings, store: JobStore, redis: Redis
) -> None:
    # RQ keeps an execution in the job's registry 60 s after the execution itself expired;
    # a dead worker's job is recovered in that window, and RQ's Job.delete fails there
    import datetime as dt

    from rq import Queue

    job_id = Client(settings, redis, store).submit(job(0))
    Queue(settings.queue_name("default"), connection=redis).remove(job_id)  # a worker took it
    store.start(job_id, "dead-worker")
    redis.zadd(f"rq:executions:{job_id}", {"0123456789abcdef": time.time() + 600})
    later = utcnow() + dt.timedelta(seconds=settings.recovery_grace_s + 1)
    counts = JobRecovery(settings, store, redis).run(now=later)
    assert counts["requeued"] == 1
    assert (store.get(job_id) or {})["status"] == "queued"
    assert job_id in Queue(settings.queue_name("default"), connection=redis).job_ids
