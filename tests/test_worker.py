"""The worker spine end to end on a real Redis and a tiny random-weight model: jobs go from the
queue to a final status in the store, bad jobs fail precisely, and the worker keeps going."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import broken_kind
import pytest
import slow_kind
import structlog
from conftest import TINY_MODEL, write_catalog
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.errors import JobStoreError
from mlx_fusion.jobs import utcnow
from mlx_fusion.registry.catalog import ModelKind


def chat_job(**input_fields: Any) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0,
        **input_fields,
    }
    return {"kind": "chat.completion", "model": TINY_MODEL, "input": body}


def enqueue_raw_rq(
    redis: Redis, job_id: str, args: list[Any], func: str = JOB_FUNCTION, **kwargs: Any
) -> None:
    Queue("fusion:default", connection=redis, serializer=JSONSerializer).enqueue_call(
        func=func, args=args, job_id=job_id, **kwargs
    )


def test_chat_job_completes_with_an_openai_result(client: Any, make_worker: Any) -> None:
    job_id = client.submit({**chat_job(), "metadata": {"team": "a"}})
    assert client.get(job_id)["status"] == "queued"
    worker = make_worker()
    assert worker.work(burst=True)
    doc = client.wait(job_id, timeout_s=5)
    assert doc["status"] == "completed", doc.get("error")
    result = doc["result"]
    assert result["object"] == "chat.completion" and result["model"] == TINY_MODEL
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in {
        "stop",
        "length",
    }
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    m = doc["metrics"]
    assert m["queue_wait_ms"] >= 0 and m["load_ms"] > 0 and m["inference_ms"] > 0
    assert m["completion_tokens"] == usage["completion_tokens"] and m["tokens_per_s"] > 0
    assert doc["created_at"] <= doc["started_at"] <= doc["finished_at"]
    assert doc["attempts"] == 1 and doc["worker"] == worker.name
    assert doc["metadata"] == {"team": "a"}


def test_text_completion_stops_at_max_tokens(client: Any, make_worker: Any) -> None:
    job_id = client.submit(
        {
            "kind": "completion",
            "model": "tiny",
            "input": {"prompt": "the cat", "max_tokens": 3, "temperature": 0},
        }
    )
    make_worker().work(burst=True)
    doc = client.get(job_id)
    assert doc["status"] == "completed", doc.get("error")
    choice = doc["result"]["choices"][0]
    assert doc["result"]["object"] == "text_completion"
    if choice["finish_reason"] == "length":
        assert doc["result"]["usage"]["completion_tokens"] == 3


def test_stop_sequence_is_honoured(client: Any, make_worker: Any) -> None:
    free = client.submit(chat_job(max_tokens=12, seed=1, temperature=1.0))
    make_worker().work(burst=True)
    text = client.get(free)["result"]["choices"][0]["message"]["content"]
    assert len(text) >= 2
    stop = text[1:3]
    stopped = client.submit(chat_job(max_tokens=12, seed=1, temperature=1.0, stop=[stop]))
    make_worker().work(burst=True)
    choice = client.get(stopped)["result"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[: text.index(stop)]


def _failed_then_next_one_runs(client: Any, make_worker: Any, job_id: str, code: str) -> dict:
    good = client.submit(chat_job())
    worker = make_worker()
    worker.work(burst=True)
    doc = client.get(job_id)
    assert doc is not None and doc["status"] == "failed", doc
    assert doc["error"]["code"] == code, doc["error"]
    assert client.get(good)["status"] == "completed"
    return doc


def test_malformed_document_fails_and_worker_goes_on(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    enqueue_raw_rq(redis, "bad-doc", [42])
    enqueue_raw_rq(redis, "bad-text", ["{not json"])
    doc = _failed_then_next_one_runs(client, make_worker, "bad-doc", "invalid_job")
    assert "must be a JSON object" in doc["error"]["message"]
    text_doc = client.get("bad-text")
    assert text_doc["status"] == "failed" and "not valid JSON" in text_doc["error"]["message"]


def test_unknown_kind_fails_with_unknown_kind(client: Any, make_worker: Any, redis: Redis) -> None:
    enqueue_raw_rq(redis, "bad-kind", [{**chat_job(), "kind": "telepathy"}])
    _failed_then_next_one_runs(client, make_worker, "bad-kind", "unknown_kind")


def test_unknown_model_fails_with_model_not_found(client: Any, make_worker: Any) -> None:
    job_id = client.submit({**chat_job(), "model": "gpt-17"})
    doc = _failed_then_next_one_runs(client, make_worker, job_id, "model_not_found")
    assert "started_at" not in doc and doc["attempts"] == 0  # failed before it ever started
    assert "gpt-17" in doc["error"]["message"]


def test_path_as_model_is_refused_without_opening_it(
    client: Any, make_worker: Any, tiny_model_dir: Path
) -> None:
    job_id = client.submit({**chat_job(), "model": str(tiny_model_dir)})
    _failed_then_next_one_runs(client, make_worker, job_id, "model_path_not_allowed")


def test_bad_sampling_values_fail_with_invalid_input(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    enqueue_raw_rq(redis, "bad-temp", [chat_job(temperature=-1)])
    doc = _failed_then_next_one_runs(client, make_worker, "bad-temp", "invalid_input")
    assert doc["error"]["field"] == "input.temperature"


def test_oversize_input_fails_with_input_too_large(
    client: Any, make_worker: Any, redis: Redis, settings: Any
) -> None:
    big = chat_job()
    big["input"]["messages"][0]["content"] = "x" * (settings.max_input_bytes + 1)
    enqueue_raw_rq(redis, "too-big", [big])
    _failed_then_next_one_runs(client, make_worker, "too-big", "input_too_large")


def test_non_whitelisted_function_never_runs(
    client: Any, make_worker: Any, redis: Redis, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    enqueue_raw_rq(redis, "evil", [str(victim)], func="os.remove")
    doc = _failed_then_next_one_runs(client, make_worker, "evil", "function_not_allowed")
    assert victim.exists()
    assert "os.remove" in doc["error"]["message"]


def test_callbacks_named_by_a_producer_never_run(
    client: Any, make_worker: Any, redis: Redis, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    enqueue_raw_rq(redis, "cb", [chat_job()])
    redis.hset("rq:job:cb", "failure_callback_name", "os.remove")
    _failed_then_next_one_runs(client, make_worker, "cb", "function_not_allowed")
    assert victim.exists()


def test_malformed_rq_hash_fails_the_job_not_the_worker(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    enqueue_raw_rq(redis, "garbled", [chat_job()])
    redis.hset("rq:job:garbled", "created_at", "yesterday-ish")
    _failed_then_next_one_runs(client, make_worker, "garbled", "invalid_job")


def test_rq_hash_without_payload_fails_the_job_not_the_worker(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    redis.hset("rq:job:hollow", mapping={"origin": "fusion:default", "status": "queued"})
    redis.rpush("rq:queue:fusion:default", "hollow")
    doc = _failed_then_next_one_runs(client, make_worker, "hollow", "invalid_job")
    assert "malformed" in doc["error"]["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-1", "true", "1e400"])
def test_odd_timeouts_fail_the_job_not_the_worker(
    client: Any, make_worker: Any, redis: Redis, literal: str
) -> None:
    doc = json.dumps({**chat_job(), "timeout_s": 0.5}).replace("0.5", literal)
    enqueue_raw_rq(redis, "odd-timeout", [{}])
    payload = f'["{JOB_FUNCTION}", null, [{doc}], {{}}]'
    redis.hset("rq:job:odd-timeout", "data", payload)
    good = client.submit(chat_job())
    make_worker().work(burst=True)
    record = client.get("odd-timeout")
    assert record["status"] == "failed"
    assert record["error"]["code"] == "invalid_job" and record["error"]["field"] == "timeout_s"
    assert client.get(good)["status"] == "completed"


def test_undecodable_payload_fails_the_job_not_the_worker(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    enqueue_raw_rq(redis, "pickled", [chat_job()])
    redis.hset("rq:job:pickled", "data", b"\x80\x04\x95 not json")
    doc = _failed_then_next_one_runs(client, make_worker, "pickled", "invalid_job")
    assert "JSON" in doc["error"]["message"]


def test_document_id_must_match_the_rq_job_id(client: Any, make_worker: Any, redis: Redis) -> None:
    enqueue_raw_rq(redis, "rq-id", [{**chat_job(), "id": "other-id"}])
    doc = _failed_then_next_one_runs(client, make_worker, "rq-id", "invalid_job")
    assert doc["error"]["field"] == "id"
    assert client.get("other-id") is None


def test_cancelled_job_is_not_run(client: Any, make_worker: Any, redis: Redis) -> None:
    job_id = client.submit(chat_job())
    assert client.cancel(job_id)
    enqueue_raw_rq(redis, job_id, [{**chat_job(), "id": job_id}])  # a duplicate delivery
    make_worker().work(burst=True)
    doc = client.get(job_id)
    assert doc["status"] == "cancelled" and "result" not in doc and doc["attempts"] == 0
    assert not client.cancel(job_id)


def test_duplicate_run_does_not_overwrite_a_finished_job(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    job_id = client.submit(chat_job(seed=3, temperature=1.0))
    make_worker().work(burst=True)
    first = client.get(job_id)
    enqueue_raw_rq(redis, job_id, [{**chat_job(seed=4, temperature=1.0), "id": job_id}])
    make_worker().work(burst=True)
    again = client.get(job_id)
    assert again["status"] == "completed" and again["result"] == first["result"]
    assert again["finished_at"] == first["finished_at"] and again["attempts"] == 1


def test_model_is_loaded_once_per_worker(client: Any, make_worker: Any) -> None:
    ids = [client.submit(chat_job()) for _ in range(3)]
    make_worker().work(burst=True)
    loads = [client.get(i)["metrics"]["load_ms"] for i in ids]
    assert loads[0] > 0 and loads[1:] == [0.0, 0.0]


def test_priority_queues_drain_high_first(client: Any, make_worker: Any) -> None:
    low = client.submit({**chat_job(), "priority": "low"})
    high = client.submit({**chat_job(), "priority": "high"})
    make_worker().work(burst=True)
    assert client.get(high)["started_at"] <= client.get(low)["started_at"]


def test_workers_get_unique_names(make_worker: Any) -> None:
    assert make_worker().name != make_worker().name


def test_a_job_past_its_timeout_fails_with_timeout(client: Any, make_worker: Any) -> None:
    slow = client.submit({**chat_job(), "timeout_s": 1, "metadata": {"sleep_s": "5"}})
    quick = client.submit(chat_job())
    started = time.monotonic()
    make_worker(kinds={ModelKind.LM: slow_kind}).work(burst=True)
    assert time.monotonic() - started < 4.5
    doc = client.get(slow)
    assert doc["status"] == "failed" and doc["error"]["code"] == "timeout"
    assert client.get(quick)["status"] == "completed"


def test_timeout_is_capped_at_the_maximum(client: Any, make_worker: Any) -> None:
    slow = client.submit({**chat_job(), "timeout_s": 3000, "metadata": {"sleep_s": "4"}})
    make_worker(kinds={ModelKind.LM: slow_kind}, job_timeout_max_s=1, job_timeout_default_s=1).work(
        burst=True
    )
    assert client.get(slow)["error"]["code"] == "timeout"


def test_long_job_is_not_declared_abandoned(
    client: Any, make_worker: Any, redis: Redis, settings: Any
) -> None:
    """Another worker's maintenance runs StartedJobRegistry.cleanup() while a job outlives
    several heartbeat TTLs; the job must stay registered and finish once."""
    job_id = client.submit({**chat_job(), "metadata": {"sleep_s": "6"}})
    worker = make_worker(kinds={ModelKind.LM: slow_kind})
    ttl = worker.get_heartbeat_ttl(None)
    assert ttl < 6
    registry = StartedJobRegistry("fusion:default", connection=redis, serializer=JSONSerializer)
    seen_expiries: list[float] = []
    stop = threading.Event()

    def other_workers_maintenance() -> None:
        while not stop.wait(0.25):
            registry.cleanup()
            for _, score in redis.zrange(registry.key, 0, -1, withscores=True):
                seen_expiries.append(score - time.time())

    watcher = threading.Thread(target=other_workers_maintenance)
    watcher.start()
    try:
        worker.work(burst=True)
    finally:
        stop.set()
        watcher.join()
    doc = client.get(job_id)
    assert doc["status"] == "completed" and doc["attempts"] == 1
    assert job_id not in FailedJobRegistry("fusion:default", connection=redis).get_job_ids()
    # the registration was short-lived and kept being renewed, not one long lease
    assert seen_expiries and max(seen_expiries) <= ttl + 1
    assert len(seen_expiries) > 15


def test_rq_result_is_small_and_points_to_the_store(
    client: Any, make_worker: Any, redis: Redis
) -> None:
    job_id = client.submit(chat_job())
    make_worker().work(burst=True)
    from rq.job import Job

    rq_job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert rq_job.get_status() == "finished"
    assert json.loads(json.dumps(rq_job.return_value())) == {"id": job_id, "status": "completed"}


def test_model_with_missing_files_fails_with_model_load_failed(
    client: Any, make_worker: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    catalog = write_catalog(
        tmp_path / "two.toml",
        {
            TINY_MODEL: {"kind": "lm", "path": tiny_model_dir},
            "broken": {"kind": "lm", "path": empty},
        },
    )
    job_id = client.submit({**chat_job(), "model": "broken"})
    good = client.submit(chat_job())
    make_worker(catalog_path=catalog).work(burst=True)
    doc = client.get(job_id)
    assert doc["status"] == "failed" and doc["error"]["code"] == "model_load_failed"
    assert "broken" in doc["error"]["message"]
    assert client.get(good)["status"] == "completed"


def test_model_raising_fails_with_inference_failed(client: Any, make_worker: Any) -> None:
    job_id = client.submit(chat_job())
    make_worker(kinds={ModelKind.LM: broken_kind}).work(burst=True)
    doc = client.get(job_id)
    assert doc["status"] == "failed" and doc["error"]["code"] == "inference_failed"
    assert "device lost" in doc["error"]["message"] and doc["attempts"] == 1


def test_log_lines_of_a_job_carry_its_request_id(client: Any, make_worker: Any) -> None:
    job_id = client.submit({**chat_job(), "request_id": "corr-7"})
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        make_worker().work(burst=True)
    events = {e["event"]: e for e in logs if e.get("job_id") == job_id}
    assert {"job_started", "job_completed"} <= events.keys()
    assert all(e["request_id"] == "corr-7" for e in events.values())


def test_unreachable_job_store_fails_the_rq_job_and_the_worker_goes_on(
    settings: Any, redis: Redis, tiny_model_dir: Path
) -> None:
    from mlx_fusion.jobs import connect_store
    from mlx_fusion.registry import Catalog, ModelRegistry
    from mlx_fusion.runner import JobRunner
    from mlx_fusion.worker import FusionWorker

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = settings.model_copy(
        update={"mongo_url": f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=300"}
    )
    store = connect_store(down, ensure_indexes=False)
    runner = JobRunner(down, store, ModelRegistry(Catalog.load(down.catalog_path), down))
    for i in range(2):
        enqueue_raw_rq(redis, f"lost-{i}", [chat_job()])
    worker = FusionWorker(settings=down, connection=redis, runner=runner)
    worker.work(burst=True)
    failed = FailedJobRegistry("fusion:default", connection=redis, serializer=JSONSerializer)
    assert sorted(failed.get_job_ids()) == ["lost-0", "lost-1"]


def test_result_past_the_inline_limit_is_stored_as_a_blob(client: Any, make_worker: Any) -> None:
    job_id = client.submit(chat_job())
    make_worker(max_result_bytes=50).work(burst=True)
    doc = client.get(job_id)
    assert doc["status"] == "completed" and doc["result"] is None
    assert doc["result_ref"]["bytes"] > 50
    result = client.get_result(job_id)
    assert result["object"] == "chat.completion" and result["id"] == f"chatcmpl-{job_id}"


def test_worker_maintenance_purges_expired_blobs(make_worker: Any, store: Any) -> None:
    past = utcnow() - dt.timedelta(days=1)
    stale = store.blobs.put("old-job", "result.json", b"{}", content_type="x", expire_at=past)
    fresh = store.blobs.put(
        "new-job", "result.json", b"{}", content_type="x", expire_at=utcnow() + dt.timedelta(days=1)
    )
    make_worker().work(burst=True)
    with pytest.raises(JobStoreError):
        store.blobs.get(stale)
    assert store.blobs.get(fresh) == b"{}"
