"""The job store, run on every backend: mongomock, the embedded montydb store and, when
FUSION_TEST_MONGO_URL is set, a real MongoDB."""

from __future__ import annotations

import datetime as dt

import pytest

from mlx_fusion.errors import IdempotencyConflict, JobStoreError
from mlx_fusion.jobs import JobSpec, JobStore, utcnow

T0 = utcnow().replace(microsecond=0)


def spec(job_id: str, **fields: object) -> JobSpec:
    return JobSpec.model_validate(
        {"id": job_id, "kind": "completion", "model": "m", "input": {"prompt": "p"}, **fields}
    )


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_insert_then_get_returns_a_queued_document(any_store: JobStore) -> None:
    assert any_store.insert(spec("j1", metadata={"a": "b"}), now=at(0)) == ("j1", True)
    doc = any_store.get("j1")
    assert doc is not None
    assert doc["status"] == "queued" and doc["attempts"] == 0
    assert doc["created_at"] == at(0) and doc["metadata"] == {"a": "b"}
    assert any_store.get("missing") is None


def test_same_idempotency_key_returns_the_first_job(any_store: JobStore) -> None:
    assert any_store.insert(spec("j1", idempotency_key="k")) == ("j1", True)
    assert any_store.insert(spec("j2", idempotency_key="k")) == ("j1", False)
    assert any_store.get("j2") is None


def test_same_idempotency_key_and_body_with_another_request_id_is_the_same_job(
    any_store: JobStore,
) -> None:
    assert any_store.insert(spec("j1", idempotency_key="k", request_id="r1"))[0] == "j1"
    assert any_store.insert(spec("j2", idempotency_key="k", request_id="r2")) == ("j1", False)


def test_same_idempotency_key_with_another_body_is_a_conflict(any_store: JobStore) -> None:
    any_store.insert(spec("j1", idempotency_key="k", metadata={"a": "1"}))
    with pytest.raises(IdempotencyConflict, match="different body") as info:
        any_store.insert(spec("j2", idempotency_key="k", metadata={"a": "2"}))
    assert info.value.code == "idempotency_conflict"
    assert any_store.get("j2") is None


def test_inserting_an_existing_id_is_an_error(any_store: JobStore) -> None:
    any_store.insert(spec("j1"))
    with pytest.raises(JobStoreError):
        any_store.insert(spec("j1"))


def test_full_lifecycle_sets_every_timestamp_and_expiry(any_store: JobStore) -> None:
    any_store.insert(spec("j1"), now=at(0))
    started = any_store.start("j1", "w1", now=at(2))
    assert started is not None
    assert started["status"] == "processing" and started["attempts"] == 1
    assert started["worker"] == "w1" and started["started_at"] == at(2)
    done = any_store.complete("j1", {"text": "ok"}, {"inference_ms": 5.0}, now=at(3))
    assert done is not None
    assert done["status"] == "completed" and done["result"] == {"text": "ok"}
    assert done["metrics"] == {"inference_ms": 5.0}
    assert done["finished_at"] == at(3)
    assert done["expire_at"] == at(3) + any_store.retention


def test_finished_job_is_never_overwritten(any_store: JobStore) -> None:
    any_store.insert(spec("j1"))
    any_store.start("j1", "w1")
    any_store.complete("j1", {"text": "first"}, {})
    assert any_store.start("j1", "w2") is None
    assert any_store.complete("j1", {"text": "second"}, {}) is None
    assert any_store.fail("j1", {"code": "x", "message": "late"}) is None
    doc = any_store.get("j1")
    assert doc is not None
    assert doc["status"] == "completed" and doc["result"] == {"text": "first"}
    assert doc["worker"] == "w1" and "error" not in doc


def test_complete_requires_processing(any_store: JobStore) -> None:
    any_store.insert(spec("j1"))
    assert any_store.complete("j1", {}, {}) is None
    assert any_store.get("j1")["status"] == "queued"  # type: ignore[index]


def test_rerun_of_a_processing_job_counts_attempts(any_store: JobStore) -> None:
    any_store.insert(spec("j1"))
    any_store.start("j1", "w1")
    again = any_store.start("j1", "w2")
    assert again is not None and again["attempts"] == 2 and again["worker"] == "w2"


def test_start_creates_the_document_a_producer_did_not(any_store: JobStore) -> None:
    doc = any_store.start(
        "raw1", "w1", spec_doc={"kind": "completion", "model": "m"}, enqueued_at=at(1), now=at(4)
    )
    assert doc is not None
    assert doc["status"] == "processing" and doc["model"] == "m"
    assert doc["created_at"] == at(1) and doc["started_at"] == at(4)


def test_fail_creates_the_document_a_producer_did_not(any_store: JobStore) -> None:
    doc = any_store.fail("raw2", {"code": "invalid_job", "message": "bad"}, spec_doc={"model": "m"})
    assert doc is not None
    assert doc["status"] == "failed" and doc["error"]["code"] == "invalid_job"
    assert "expire_at" in doc


def test_cancel_only_a_queued_job(any_store: JobStore) -> None:
    any_store.insert(spec("q"))
    any_store.insert(spec("r"))
    any_store.start("r", "w1")
    assert any_store.cancel("q") is not None
    assert any_store.cancel("r") is None
    assert any_store.start("q", "w1") is None
    assert any_store.get("q")["status"] == "cancelled"  # type: ignore[index]


def test_a_stopped_running_job_ends_cancelled_once(any_store: JobStore) -> None:
    any_store.insert(spec("q"))
    any_store.insert(spec("r"))
    any_store.start("r", "w1")
    assert any_store.cancel("q", running=True) is None  # not running
    done = any_store.cancel("r", running=True)
    assert done is not None and done["status"] == "cancelled" and done["finished_at"] is not None
    assert any_store.complete("r", {"late": True}, {}) is None  # a late result changes nothing
    assert any_store.cancel("r", running=True) is None


def test_list_filters_and_orders_newest_first(any_store: JobStore) -> None:
    for i in range(5):
        any_store.insert(spec(f"j{i}", model="a" if i % 2 else "b"), now=at(i))
    any_store.start("j4", "w")
    assert [d["id"] for d in any_store.list()] == ["j4", "j3", "j2", "j1", "j0"]
    assert [d["id"] for d in any_store.list(model="a")] == ["j3", "j1"]
    assert [d["id"] for d in any_store.list(status="processing")] == ["j4"]
    assert [d["id"] for d in any_store.list(since=at(1), until=at(3))] == ["j2", "j1"]
    assert [d["id"] for d in any_store.list(limit=2)] == ["j4", "j3"]


def test_timestamps_come_back_timezone_aware(any_store: JobStore) -> None:
    any_store.insert(spec("j1"))
    doc = any_store.get("j1")
    assert doc is not None and doc["created_at"].tzinfo is not None
    assert abs((utcnow() - doc["created_at"]).total_seconds()) < 60


def test_mongomock_has_the_indexes(store: JobStore) -> None:
    info = store.collection.index_information()
    keys = {tuple(k for k, _ in v["key"]): v for v in info.values()}
    assert keys[("idempotency_key",)]["unique"] is True
    assert keys[("expire_at",)]["expireAfterSeconds"] == 0
    assert ("status", "created_at") in keys and ("request_id",) in keys


def test_large_result_goes_to_the_blob_store_and_expires_with_the_job(
    any_store: JobStore,
) -> None:
    any_store.insert(spec("big"))
    any_store.insert(spec("small"))
    for job_id in ("big", "small"):
        any_store.start(job_id, "w")
    result = {"object": "list", "data": [{"embedding": [0.5] * 200}]}
    done = any_store.complete("big", result, {}, max_inline_bytes=100)
    assert done is not None and done["result"] is None
    assert done["result_ref"]["bytes"] > 100
    assert done["result_ref"]["content_type"] == "application/json"
    assert any_store.result("big") == result
    any_store.complete("small", {"text": "ok"}, {}, max_inline_bytes=100)
    assert any_store.get("small")["result"] == {"text": "ok"}  # type: ignore[index]
    assert any_store.blobs is not None
    assert any_store.blobs.purge_expired(utcnow()) == 0
    later = utcnow() + any_store.retention + dt.timedelta(seconds=1)
    assert any_store.blobs.purge_expired(later) == 1
    with pytest.raises(JobStoreError):
        any_store.result("big")


def test_unknown_blob_ids_are_refused(any_store: JobStore) -> None:
    assert any_store.blobs is not None
    for blob_id in ("nope", "../../etc/passwd", "0" * 24):
        with pytest.raises(JobStoreError):
            any_store.blobs.get(blob_id)
