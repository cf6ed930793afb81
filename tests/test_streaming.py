"""Token streams on a real redis-server: the writer's entries and chunk shapes, the reader
(order, waiting, timeouts, errors, gaps), and ``Client.stream`` for jobs that have no stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_store, unused_port
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from mlx_fusion import errors
from mlx_fusion.client import Client
from mlx_fusion.config import Settings
from mlx_fusion.jobs.document import parse_job
from mlx_fusion.jobs.store import JobStore
from mlx_fusion.streaming import (
    StreamWriter,
    read_stream,
    stream_key,
    writer_for_job,
)

PREFIX = "fusion"
JOB = "job1"
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def writer(redis: Redis, kind: str = "chat.completion", **kwargs: Any) -> StreamWriter:
    return StreamWriter(redis, PREFIX, JOB, kind=kind, model="tiny-llama", created=1700, **kwargs)


def chunks(redis: Redis, job_id: str = JOB, timeout_s: float = 2) -> list[dict[str, Any]]:
    return [e.chunk for e in read_stream(redis, PREFIX, job_id, timeout_s=timeout_s) if e.chunk]


def write_answer(w: StreamWriter, pieces: tuple[str, ...] = ("Hel", "lo")) -> None:
    for piece in pieces:
        w.delta(piece, produced_at=time.time())
    w.finish("stop", USAGE)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return make_store("mongomock", tmp_path)


@pytest.fixture
def client(redis_url: str, redis: Redis, store: JobStore, tmp_path: Path) -> Client:
    settings = Settings(
        redis_url=redis_url,
        mongo_url="mongomock://",
        data_dir=tmp_path / "data",
        _env_file=None,  # type: ignore[call-arg]
    )
    return Client(settings, redis, store)


def chat_doc(job_id: str = JOB, **input_fields: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "kind": "chat.completion",
        "model": "tiny",
        "input": {"messages": [{"role": "user", "content": "Hi"}], **input_fields},
    }


def test_stream_key_follows_the_queue_prefix() -> None:
    assert stream_key("fusion", "abc") == "fusion:stream:abc"


def test_reader_gets_the_writers_chunks_in_order(redis: Redis) -> None:
    write_answer(writer(redis), ("The", " capital", " is", " Paris."))
    got = chunks(redis)
    contents = [c["choices"][0]["delta"].get("content") for c in got]
    assert contents == ["", "The", " capital", " is", " Paris.", None]


def test_chat_stream_starts_with_the_role_and_ends_with_the_finish_reason(redis: Redis) -> None:
    write_answer(writer(redis))
    got = chunks(redis)
    assert {c["id"] for c in got} == {"chatcmpl-job1"}
    assert {c["object"] for c in got} == {"chat.completion.chunk"}
    assert {(c["model"], c["created"]) for c in got} == {("tiny-llama", 1700)}
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in got] == [None, None, None, "stop"]
    assert got[-1]["choices"][0]["delta"] == {}
    assert all("usage" not in c for c in got)


def test_completion_stream_is_text_completion_chunks_without_a_role(redis: Redis) -> None:
    write_answer(writer(redis, kind="completion"))
    got = chunks(redis)
    assert {(c["id"], c["object"]) for c in got} == {("cmpl-job1", "text_completion")}
    assert [c["choices"][0]["text"] for c in got] == ["Hel", "lo", ""]
    assert [c["choices"][0]["finish_reason"] for c in got] == [None, None, "stop"]


def test_include_usage_adds_a_last_chunk_with_no_choices_and_the_usage(redis: Redis) -> None:
    write_answer(writer(redis, include_usage=True))
    got = chunks(redis)
    assert got[-1]["choices"] == [] and got[-1]["usage"] == USAGE
    assert got[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in got[:-1])


def test_tool_calls_go_in_one_delta_with_their_index(redis: Redis) -> None:
    w = writer(redis)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    w.tool_calls([call], produced_at=time.time())
    w.finish("tool_calls")
    got = chunks(redis)
    assert got[1]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **call}]}
    assert got[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_entries_carry_type_seq_and_produced_at(redis: Redis) -> None:
    w = writer(redis)
    w.delta("x", produced_at=1234.5)
    w.finish("stop", produced_at=1240.25)
    entries = redis.xrange(stream_key(PREFIX, JOB))
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    assert [(f["type"], f["seq"], f["produced_at"]) for f in fields] == [
        ("chunk", "0", "1234.5"),
        ("chunk", "1", "1234.5"),
        ("chunk", "2", "1240.25"),
        ("done", "3", "1240.25"),
    ]


def test_entries_read_carry_produced_and_received_times(redis: Redis) -> None:
    w = writer(redis)
    w.delta("x", produced_at=1234.5)
    w.finish("stop")
    before = time.time()
    entries = list(read_stream(redis, PREFIX, JOB, timeout_s=2))
    assert entries[1].produced_at == 1234.5
    assert all(e.received_at >= before for e in entries)


def test_empty_pieces_are_not_published(redis: Redis) -> None:
    w = writer(redis, kind="completion")
    w.delta("", produced_at=time.time())
    w.delta("a", produced_at=time.time())
    w.finish("stop")
    assert redis.xlen(stream_key(PREFIX, JOB)) == 3  # "a", the finish chunk, done


def test_stream_is_trimmed_to_about_max_len(redis: Redis) -> None:
    w = writer(redis, kind="completion", max_len=50)
    for _ in range(600):
        w.delta("x", produced_at=0.0)
    # MAXLEN ~ trims whole radix-tree nodes (100 entries each by default)
    assert 50 <= redis.xlen(stream_key(PREFIX, JOB)) <= 150


def test_every_write_sets_the_expiry(redis: Redis) -> None:
    w = writer(redis, ttl_s=120)
    w.delta("x", produced_at=0.0)
    assert 110 < redis.ttl(stream_key(PREFIX, JOB)) <= 120
    redis.persist(stream_key(PREFIX, JOB))
    w.finish("stop")
    assert 110 < redis.ttl(stream_key(PREFIX, JOB)) <= 120


def test_an_error_entry_raises_the_jobs_error(redis: Redis) -> None:
    w = writer(redis)
    w.delta("x", produced_at=0.0)
    w.fail("cancelled", "cancelled by Tier 2")
    with pytest.raises(errors.JobCancelled, match="cancelled by Tier 2"):
        chunks(redis)


def test_nothing_is_written_after_the_stream_ended(redis: Redis) -> None:
    w = writer(redis, kind="completion")
    w.fail("timeout", "too slow")
    w.delta("late", produced_at=0.0)
    w.finish("stop")
    assert redis.xlen(stream_key(PREFIX, JOB)) == 1


def test_reader_times_out_when_nothing_comes(redis: Redis) -> None:
    started = time.monotonic()
    with pytest.raises(errors.StreamTimeout) as e:
        chunks(redis, timeout_s=0.3)
    assert e.value.code == "stream_timeout"
    assert 0.25 < time.monotonic() - started < 1.5


def test_reader_started_before_the_first_entry_gets_everything(redis: Redis) -> None:
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend(chunks(redis, timeout_s=5)))
    reader.start()
    time.sleep(0.2)
    write_answer(writer(redis), ("a", "b", "c"))
    reader.join(timeout=5)
    assert [c["choices"][0]["delta"].get("content") for c in got] == ["", "a", "b", "c", None]


def test_a_new_attempt_restarting_the_stream_raises_in_a_reader_midway(redis: Redis) -> None:
    writer(redis).delta("first attempt", produced_at=0.0)
    entries = read_stream(redis, PREFIX, JOB, timeout_s=2)
    assert next(entries).seq == 0 and next(entries).seq == 1
    time.sleep(0.005)  # entry ids are milliseconds: a real new attempt comes seconds later
    write_answer(writer(redis))  # the job ran again: its writer starts the stream over
    with pytest.raises(errors.StreamUnavailable, match="started again"):
        next(entries)


def test_a_new_attempt_replaces_what_the_earlier_one_wrote(redis: Redis) -> None:
    writer(redis).delta("first attempt", produced_at=0.0)
    write_answer(writer(redis), ("second",))
    contents = [c["choices"][0]["delta"].get("content") for c in chunks(redis)]
    assert contents == ["", "second", None]


def test_a_reader_of_a_trimmed_stream_raises_instead_of_skipping(redis: Redis) -> None:
    w = writer(redis, kind="completion", max_len=10)
    for _ in range(300):
        w.delta("x", produced_at=0.0)
    w.finish("stop")
    with pytest.raises(errors.StreamUnavailable, match="trimmed"):
        chunks(redis)


def test_writer_swallows_a_dead_redis() -> None:
    no_retry = Retry(NoBackoff(), 0)
    dead = Redis(port=unused_port(), socket_connect_timeout=0.2, retry=no_retry)  # loopback
    w = StreamWriter(dead, PREFIX, JOB, kind="chat.completion", model="m", created=0)
    with capture_logs() as logs:
        w.delta("x", produced_at=0.0)
        w.delta("y", produced_at=0.0)
        w.finish("stop", USAGE)
        w.fail("internal_error", "boom")
    assert w.broken
    assert [entry["event"] for entry in logs] == ["stream_write_failed"]


def test_writer_for_job_follows_the_stream_field() -> None:
    doc = chat_doc(stream=True, stream_options={"include_usage": True})
    streamed = parse_job(doc, max_input_bytes=1_000_000)
    w = writer_for_job(Redis(), PREFIX, streamed, "tiny-llama", created=5)
    assert w is not None and w.context.include_usage and w.key == "fusion:stream:job1"
    plain = parse_job(chat_doc(), max_input_bytes=1_000_000)
    assert writer_for_job(Redis(), PREFIX, plain, "tiny-llama") is None


def test_stream_options_without_stream_are_invalid_input() -> None:
    with pytest.raises(errors.InvalidInput) as e:
        parse_job(chat_doc(stream_options={"include_usage": True}), max_input_bytes=1_000_000)
    assert e.value.field == "input.stream_options"


def submitted(client: Client, doc: dict[str, Any]) -> str:
    spec = parse_job(doc, max_input_bytes=1_000_000).spec
    job_id, _ = client.store.insert(spec)
    return job_id


def test_client_stream_yields_the_chunks_of_a_stream_job(client: Client, redis: Redis) -> None:
    job_id = submitted(client, chat_doc(stream=True))
    write_answer(writer(redis))
    got = list(client.stream(job_id, timeout_s=2))
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert got[-1]["choices"][0]["finish_reason"] == "stop"


def test_client_stream_refuses_a_job_not_submitted_with_stream(client: Client) -> None:
    job_id = submitted(client, chat_doc())
    with pytest.raises(errors.StreamUnavailable, match="stream: true"):
        next(iter(client.stream(job_id, timeout_s=5)))


def test_client_stream_raises_the_error_of_a_job_that_failed_before_streaming(
    client: Client,
) -> None:
    job_id = submitted(client, chat_doc(stream=True))
    client.store.fail(job_id, {"code": "model_not_found", "message": "no model 'tiny'"})
    started = time.monotonic()
    with pytest.raises(errors.ModelNotFound, match="no model 'tiny'"):
        next(iter(client.stream(job_id, timeout_s=5)))
    assert time.monotonic() - started < 1


def test_client_stream_of_a_cancelled_queued_job_raises_cancelled(client: Client) -> None:
    job_id = submitted(client, chat_doc(stream=True))
    client.store.cancel(job_id)
    with pytest.raises(errors.JobCancelled):
        next(iter(client.stream(job_id, timeout_s=5)))


def test_client_stream_of_a_completed_job_without_its_stream_raises(client: Client) -> None:
    job_id = submitted(client, chat_doc(stream=True))
    client.store.start(job_id, "w1")
    client.store.complete(job_id, {"object": "chat.completion"}, {})
    with pytest.raises(errors.StreamUnavailable, match="get_result"):
        next(iter(client.stream(job_id, timeout_s=5)))


def test_client_stream_stops_waiting_when_the_job_fails_meanwhile(
    client: Client, redis: Redis
) -> None:
    job_id = submitted(client, chat_doc(stream=True))
    client.store.start(job_id, "w1")
    writer(redis).delta("partial", produced_at=0.0)  # then the worker died without ending it
    got: Iterator[Any] = client.iter_stream_entries(job_id, timeout_s=10, block_ms=50)
    assert [e.seq for e in (next(got), next(got))] == [0, 1]
    client.store.fail(job_id, {"code": "worker_lost", "message": "its worker died"})
    with pytest.raises(errors.WorkerLost):
        next(got)


def test_client_stream_waits_for_a_queued_job(client: Client, redis: Redis) -> None:
    job_id = submitted(client, chat_doc(stream=True))
    got: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: got.extend(client.stream(job_id, timeout_s=5)))
    reader.start()
    time.sleep(0.3)
    client.store.start(job_id, "w1")
    write_answer(writer(redis))
    reader.join(timeout=5)
    assert got[-1]["choices"][0]["finish_reason"] == "stop"
