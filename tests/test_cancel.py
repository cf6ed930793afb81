"""Cancelling running jobs: the worker sees the cancellation within a poll, the job stops at its
next check (between tokens, for language models) or has its model process killed after the grace
time, ends ``cancelled`` with a ``job.cancelled`` webhook pending, and the worker goes on.

The worker runs in the test's main thread (RQ's timeouts need it); the cancellation comes from a
thread, as from another process. Models run in their own processes (the stand-in kind)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import slow_kind
from conftest import TINY_MODEL, fusion_env, run_python, settings_from_env
from redis import Redis

from mlx_fusion.client import Client
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.registry.catalog import ModelKind

LONG_S = 60.0


def sleeping(seconds: float, **metadata: str) -> dict[str, Any]:
    return {
        "kind": "completion",
        "model": TINY_MODEL,
        "input": {"prompt": "hi"},
        "metadata": {"sleep_s": str(seconds), **metadata},
        "webhook": {"url": "http://127.0.0.1:9/hook"},
    }


def cancel_once_running(client: Any, job_id: str) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            record = client.get(job_id)
            if record is not None and record["status"] == "processing":
                assert client.cancel(job_id)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_running_job_stops_at_its_next_check_and_ends_cancelled(
    client: Any, make_worker: Any
) -> None:
    job_id = client.submit(sleeping(LONG_S))
    after = client.submit(sleeping(0))
    canceller = cancel_once_running(client, job_id)
    started = time.monotonic()
    make_worker(kinds={ModelKind.LM: slow_kind}).work(burst=True)
    canceller.join()
    assert time.monotonic() - started < LONG_S / 2  # it did not run to its end
    record = client.get(job_id)
    assert record["status"] == "cancelled" and "error" not in record
    assert record["webhook"]["event"] == "job.cancelled"
    assert record["webhook"]["state"] == "pending"
    assert client.get(after)["status"] == "completed"
    assert not client.cancel(job_id)  # finished


def test_job_that_ignores_the_check_is_killed_after_the_grace_time(
    client: Any, make_worker: Any
) -> None:
    worker = make_worker(kinds={ModelKind.LM: slow_kind}, cancel_grace_s=1.0)
    # loaded first, so the cancel reaches the job running (a cancel that arrives during the load
    # stops the job before it runs, and nothing needs killing)
    worker.runner.registry.load(TINY_MODEL)
    job_id = client.submit(sleeping(LONG_S, ignore_cancel="1"))
    after = client.submit(sleeping(0))
    canceller = cancel_once_running(client, job_id)
    started = time.monotonic()
    worker.work(burst=True)
    canceller.join()
    assert time.monotonic() - started < LONG_S / 2
    assert client.get(job_id)["status"] == "cancelled"
    assert client.get(after)["status"] == "completed"  # on a freshly loaded model
    stats = worker.runner.registry.snapshot()["stats"]
    assert stats["loads"] == 2, stats  # the first, and again after the kill


def test_cancel_of_an_unknown_job_is_refused(client: Any) -> None:
    assert not client.cancel("no-such-job")


def test_cli_cancels_a_queued_job_then_refuses_it_finished(
    tmp_path: Path, redis_url: str, catalog_path: Path, redis: Redis
) -> None:
    env = fusion_env(tmp_path, redis_url, catalog_path)
    settings = settings_from_env(env)
    store = connect_store(settings)
    job_id = Client(settings, redis, store).submit(sleeping(0))
    done = run_python(env, "-m", "mlx_fusion", "cancel", job_id, timeout_s=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "cancelled"
    assert store.get(job_id)["status"] == "cancelled"  # type: ignore[index]
    again = run_python(env, "-m", "mlx_fusion", "cancel", job_id, timeout_s=60)
    assert again.returncode == 1 and "already finished" in again.stdout
