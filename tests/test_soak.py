"""Soak: thousands of mixed jobs with failures injected, through one worker on a real Redis.
Afterwards every job is in exactly one final state, the counts match what was injected, nothing is
left on the queues, and the worker's memory has not grown past a stated bound.

``FUSION_SOAK_JOBS`` sets the size (CI runs the default; run bigger on demand, e.g.
``FUSION_SOAK_JOBS=20000 scripts/test tests/test_soak.py``).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import random
from typing import Any

import flaky_kind
import psutil
import pytest
from conftest import TINY_MODEL
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.jobs.store import utcnow
from mlx_fusion.registry.catalog import ModelKind

SOAK_JOBS = int(os.environ.get("FUSION_SOAK_JOBS", "1500"))
MEMORY_GROWTH_BOUND_BYTES = 16 * 1024 * 1024
"""The worker's RSS may grow by at most this much from the first batch to the end."""

MIX = {"ok": 0.55, "big": 0.1, "raise": 0.15, "invalid": 0.1, "cancel": 0.05, "unknown_model": 0.05}


def expected_status(kind: str) -> str:
    if kind in ("ok", "big"):
        return "completed"
    return "cancelled" if kind == "cancel" else "failed"


@pytest.mark.slow
def test_soak_every_job_ends_once_and_memory_stays_bounded(
    client: Any, make_worker: Any, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest keeps every log record it captures: RQ's would count as the worker's memory
    monkeypatch.setattr(logging.getLogger("rq"), "propagate", False)
    rng = random.Random(20261126)
    raw_queue = Queue("fusion:default", connection=redis, serializer=JSONSerializer)
    worker = make_worker(
        kinds={ModelKind.LM: flaky_kind}, registry_mode="inprocess", max_result_bytes=2000
    )
    process = psutil.Process()
    planned: dict[str, str] = {}
    statuses: dict[str, str] = {}
    batches = 5
    rss_after_first = 0
    for batch in range(batches):
        for _ in range(SOAK_JOBS // batches):
            kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            doc: dict[str, Any] = {
                "kind": "completion",
                "model": TINY_MODEL,
                "input": {"prompt": "soak"},
                "metadata": {"outcome": kind},
                "priority": rng.choice(["high", "default", "low"]),
            }
            if kind == "invalid":  # written by hand, past the client's validation
                job_id = f"raw-{len(planned)}"
                doc["input"]["temperature"] = -1
                raw_queue.enqueue_call(
                    func=JOB_FUNCTION, args=({**doc, "id": job_id},), job_id=job_id
                )
            else:
                if kind == "unknown_model":
                    doc["model"] = "no-such-model"
                job_id = client.submit(doc)
                if kind == "cancel":
                    assert client.cancel(job_id)
            planned[job_id] = kind
        worker.work(burst=True)
        # read this batch's records, then drop them (and their blobs): the in-memory store must
        # not count as the worker's memory
        for record in client.list(limit=10 * SOAK_JOBS):
            assert record["id"] not in statuses, "one record per job"
            statuses[record["id"]] = record["status"]
        client.store.collection.delete_many({})
        client.store.blobs.purge_expired(utcnow() + dt.timedelta(days=365))
        if batch == 0:
            rss_after_first = process.memory_info().rss
    growth = process.memory_info().rss - rss_after_first
    assert set(statuses) == set(planned)
    wrong = {j: (k, statuses[j]) for j, k in planned.items() if statuses[j] != expected_status(k)}
    assert wrong == {}
    counts = collections.Counter(statuses.values())
    assert sum(counts.values()) == len(planned)
    for name in ("fusion:high", "fusion:default", "fusion:low"):
        assert redis.llen(f"rq:queue:{name}") == 0
    print(f"soak: {len(planned)} jobs {dict(counts)}; worker RSS grew {growth / 2**20:.1f} MiB")
    assert growth < MEMORY_GROWTH_BOUND_BYTES, growth
