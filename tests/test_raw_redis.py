"""Producers in other languages: a job enqueued with plain Redis commands (no rq anywhere in the
producer) is processed exactly like one from the Python client. This module does not import rq."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import zlib
from typing import Any

from conftest import REPO, TINY_MODEL
from redis import Redis

DOCUMENT = {
    "kind": "chat.completion",
    "model": TINY_MODEL,
    "input": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3},
    "request_id": "corr-42",
}


def test_script_producer_without_rq_gets_a_completed_job(
    redis_url: str, redis: Redis, make_worker: Any, client: Any
) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "raw_enqueue.py"), redis_url],
        input=json.dumps({**DOCUMENT, "id": "raw-script-1"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == "raw-script-1"
    assert client.get("raw-script-1") is None  # the producer wrote nothing to MongoDB
    make_worker().work(burst=True)
    doc = client.get("raw-script-1")
    assert doc["status"] == "completed", doc.get("error")
    assert doc["result"]["object"] == "chat.completion"
    assert doc["request_id"] == "corr-42" and doc["model"] == TINY_MODEL
    assert doc["created_at"] <= doc["started_at"] <= doc["finished_at"]
    assert doc["metrics"]["queue_wait_ms"] >= 0


def test_raw_commands_with_compressed_payload_and_no_id(
    redis: Redis, make_worker: Any, client: Any
) -> None:
    job_id = "raw-zlib-1"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    payload = zlib.compress(
        json.dumps(["mlx_fusion.worker.run_job", None, [DOCUMENT], {}]).encode()
    )
    redis.hset(
        f"rq:job:{job_id}",
        mapping={
            "data": payload,
            "origin": "fusion:high",
            "status": "queued",
            "created_at": now,
            "enqueued_at": now,
            "timeout": "60",
        },
    )
    redis.rpush("rq:queue:fusion:high", job_id)
    redis.sadd("rq:queues", "rq:queue:fusion:high")
    make_worker().work(burst=True)
    doc = client.get(job_id)
    assert doc["status"] == "completed", doc.get("error")
    assert doc["id"] == job_id and doc["priority"] == "default"
    assert doc["result"]["usage"]["completion_tokens"] >= 1
