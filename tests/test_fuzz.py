"""Garbage in, precise errors out: arbitrary JSON documents, wrong types, huge strings, deep
nesting, invalid UTF-8 and hostile ids, at ``Client.submit`` and on the raw Redis path (hashes
written without rq, as a producer in any language would). Every one ends as a validation error
(submit) or a failed job record (raw), and the worker never stops.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
import zlib
from typing import Any

import slow_kind
from conftest import TINY_MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.errors import FusionError
from mlx_fusion.registry.catalog import ModelKind

KINDS = ["chat.completion", "completion", "embedding", "transcription", "image.generation"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
hostile_ids = st.sampled_from(
    ["", "../../etc/passwd", "a" * 500, "id with spaces", "rq:job:x", "\x00", "é", "-", "_"]
) | st.text(max_size=80)


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": [value]}
    return value


special_values = st.sampled_from(
    [nested(200), nested(5000), "x" * 2_000_000, ["y" * 10_000] * 50, {"\ud800": 1}]
)

documents = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": hostile_ids,
            "kind": st.sampled_from(KINDS) | st.text(max_size=20) | json_values,
            "model": st.just(TINY_MODEL) | st.text(max_size=20) | json_values,
            "input": st.fixed_dictionaries(
                {},
                optional={
                    "prompt": st.text(max_size=30) | json_values | special_values,
                    "messages": json_values | special_values,
                    "max_tokens": json_values,
                    "temperature": json_values,
                },
            )
            | json_values,
            "priority": st.sampled_from(["high", "default", "low"]) | json_values,
            "metadata": json_values,
            "request_id": json_values,
            "idempotency_key": json_values,
            "webhook": json_values | st.fixed_dictionaries({"url": st.text(max_size=40)}),
            "timeout_s": json_values,
            "extra": json_values | special_values,
        },
    )
    | json_values
    | special_values
)

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FAST
@given(document=documents)
def test_submit_of_anything_is_a_job_or_a_precise_error(client: Any, document: Any) -> None:
    before = len(client.list(limit=10_000))
    try:
        job_id = client.submit(document)
    except FusionError as e:
        assert e.code in {
            "invalid_job",
            "unknown_kind",
            "invalid_input",
            "input_too_large",
            "input_path_not_allowed",
            "idempotency_conflict",
        }, e.to_dict()
        assert len(client.list(limit=10_000)) == before  # nothing half-written
        return
    assert client.get(job_id)["status"] == "queued"


def raw_hash(redis: Redis, job_id: str, data: bytes, queue: str = "fusion:default") -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with redis.pipeline(transaction=True) as tx:
        tx.hset(
            f"rq:job:{job_id}",
            mapping={
                "data": data,
                "origin": queue,
                "status": "queued",
                "created_at": now,
                "enqueued_at": now,
                "timeout": 60,
            },
        )
        tx.rpush(f"rq:queue:{queue}", job_id)
        tx.sadd("rq:queues", f"rq:queue:{queue}")
        tx.execute()


def payload_of(document: Any) -> bytes:
    try:
        return json.dumps([JOB_FUNCTION, None, [document], {}]).encode()
    except (ValueError, RecursionError):
        return b"[not json"


garbage_payloads = st.sampled_from(
    [
        b"",
        b"\xff\xfe\xfa invalid utf-8",
        zlib.compress(b"\xff\xfe"),
        b"[1, 2",
        b"null",
        json.dumps(["os.system", None, ["echo pwned"], {}]).encode(),
        json.dumps([JOB_FUNCTION, None, [], {}]).encode(),
        json.dumps([JOB_FUNCTION, None, [{}], {"extra": 1}]).encode(),
        json.dumps([JOB_FUNCTION, "instance", [{}], {}]).encode(),
        b'{"a": [' * 3000 + b'"deep"' + b"]}" * 3000,  # nested past Python's recursion limit
    ]
)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batch=st.lists(documents.map(payload_of) | garbage_payloads, min_size=15, max_size=30),
    bad_ids=st.lists(
        st.sampled_from(["bad id!", "../../x", "é", "", "a b"]) | st.text(min_size=1, max_size=30),
        max_size=5,
    ),
)
def test_raw_redis_garbage_fails_each_job_and_the_worker_goes_on(
    make_worker: Any, client: Any, redis: Redis, batch: list[bytes], bad_ids: list[str]
) -> None:
    redis.flushdb()
    ids = [f"fuzz-{uuid.uuid4().hex[:12]}" for _ in batch]
    for job_id, data in zip(ids, batch, strict=True):
        raw_hash(redis, job_id, data)
    for bad_id in bad_ids:  # queue entries no producer could have made with rq
        raw_hash(redis, bad_id, payload_of({"kind": "completion"}))
    sentinel = client.submit(
        {"kind": "completion", "model": TINY_MODEL, "input": {"prompt": "after the garbage"}}
    )
    make_worker(kinds={ModelKind.LM: slow_kind}).work(burst=True)
    assert client.get(sentinel)["status"] == "completed"  # the worker went on to the end
    for job_id in ids:
        record = client.get(job_id)
        assert record is not None, job_id
        assert record["status"] in {"failed", "completed"}, record
        if record["status"] == "failed":
            assert record["error"]["code"] != "internal_error", record["error"]
