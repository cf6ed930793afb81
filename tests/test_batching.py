"""Continuous batching: many chat and completion jobs of one model in one mlx-lm BatchGenerator.

Correctness first: under greedy sampling in float32 on the tiny CPU model, every batched job's
result equals the result of running it alone (``lm.run``), whatever else shares the batch;
then one job's failure, cancellation or timeout leaves the others untouched; then the whole path
through a real worker (claims, RQ bookkeeping, records, streams).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import build_worker, worker_settings, write_catalog
from redis import Redis

from mlx_fusion.client import Client
from mlx_fusion.errors import InvalidInput, JobCancelled, JobTimeout, ModelCrashed
from mlx_fusion.jobs.document import Job, parse_job
from mlx_fusion.jobs.store import JobStore
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.multiplex import Request
from mlx_fusion.registry.process import ModelProcess

LM_KIND = "mlx_fusion.registry.kinds.lm"


def _chat(i: int, **extra: Any) -> dict[str, Any]:
    words = " ".join(f"word{i}" for _ in range(1 + i % 4))
    return {
        "id": f"job-{i}",
        "kind": "chat.completion",
        "model": "tiny",
        "input": {
            "messages": [{"role": "user", "content": f"Hello {words}"}],
            "max_tokens": 10 + i,
            "temperature": 0,
            **extra,
        },
    }


def _job(document: dict[str, Any]) -> Job:
    return parse_job(document, max_input_bytes=1 << 20)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {**a, "created": 0} == {**b, "created": 0}


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir: Path) -> Any:
    from mlx_fusion.registry.kinds import lm

    return lm.load(ModelSpec(id="tiny", kind="lm", path=tiny_model_dir))


def _drain(engine: Any) -> dict[int, tuple[str, Any]]:
    ended: dict[int, tuple[str, Any]] = {}
    while engine.busy:
        for event in engine.step():
            if event.type != "token":
                ended[event.tag] = (event.type, event.payload)
    return ended


MIXED = [
    _chat(0),
    _chat(1),
    _chat(2, stop=["o"]),
    _chat(3, logprobs=True, top_logprobs=2),
    _chat(4, response_format={"type": "json_object"}),
    _chat(5, repetition_penalty=1.3),
    _chat(6, seed=7, temperature=0.8),
    {
        "id": "job-7",
        "kind": "completion",
        "model": "tiny",
        "input": {"prompt": "The cat", "max_tokens": 9, "temperature": 0},
    },
]


def _alone(model: Any, document: dict[str, Any]) -> tuple[str, Any]:
    from mlx_fusion.registry.kinds import lm

    try:
        return "done", lm.run(model, _job(document))
    except Exception as e:
        return "error", e


def test_each_batched_job_gets_exactly_its_unbatched_result(tiny_lm: Any) -> None:
    from mlx_fusion.registry.kinds import lm

    alone = {n: _alone(tiny_lm, d) for n, d in enumerate(MIXED)}
    engine = lm.BatchEngine(tiny_lm, 32)
    for n, document in enumerate(MIXED):
        engine.submit(n, _job(document))
    ended = _drain(engine)
    assert sorted(ended) == list(range(len(MIXED)))
    for n, (kind, payload) in ended.items():
        assert kind == alone[n][0], (MIXED[n]["id"], payload)
        if kind == "error":  # the JSON job's noise is cut by max_tokens: the same error
            assert repr(payload) == repr(alone[n][1])
            continue
        assert _same(payload[0], alone[n][1][0]), MIXED[n]["id"]
        assert payload[1]["completion_tokens"] == alone[n][1][1]["completion_tokens"]
    batched = [
        ended[n][1][1].get("batch_size", 1) for n in range(len(MIXED)) if ended[n][0] == "done"
    ]
    assert max(batched) >= 6  # the unseeded jobs really shared the batch


def _variant(n: int) -> str:
    extra = sorted(MIXED[n]["input"].keys() - {"messages", "max_tokens", "temperature"})
    return "-".join(extra) or "plain"


@pytest.mark.parametrize("first", [0, 2, 3, 4, 5], ids=_variant)
def test_a_job_running_alone_moves_into_the_batch_with_its_unbatched_result(
    tiny_lm: Any, first: int
) -> None:
    from mlx_fusion.registry.kinds import lm

    long_first = {**MIXED[first], "input": {**MIXED[first]["input"], "max_tokens": 30}}
    engine = lm.BatchEngine(tiny_lm, 4)
    engine.submit(0, _job(long_first))  # nothing else runs: generate_step
    for _ in range(5):
        engine.step()
    assert engine._alone is not None
    engine.submit(1, _job(_chat(1)))  # the first moves into the batch and goes on
    ended = _drain(engine)
    for tag, document in ((0, long_first), (1, _chat(1))):
        kind, payload = _alone(tiny_lm, document)
        assert ended[tag][0] == kind, (tag, ended[tag])
        if kind == "done":
            assert _same(ended[tag][1][0], payload[0]), tag
        else:
            assert repr(ended[tag][1]) == repr(payload)


def test_a_refused_or_cancelled_job_leaves_the_others_untouched(tiny_lm: Any) -> None:
    from mlx_fusion.registry.kinds import lm

    engine = lm.BatchEngine(tiny_lm, 8)
    engine.submit(0, _job(_chat(0, max_tokens=40)))
    engine.submit(1, _job(_chat(1, max_tokens=40)))
    bad = _chat(
        2,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {"type": "object", "patternProperties": {"a": {}}},
            },
        },
    )
    with pytest.raises(InvalidInput):
        engine.submit(2, _job(bad))
    engine.step()
    engine.cancel(1)
    engine.cancel(0, timed_out=False)
    engine.cancel(0)  # twice: once
    engine.submit(3, _job(_chat(3)))
    ended = _drain(engine)
    assert isinstance(ended[1][1], JobCancelled) and isinstance(ended[0][1], JobCancelled)
    assert _same(ended[3][1][0], lm.run(tiny_lm, _job(_chat(3)))[0])


def test_a_timed_out_job_ends_with_timeout(tiny_lm: Any) -> None:
    from mlx_fusion.registry.kinds import lm

    engine = lm.BatchEngine(tiny_lm, 8)
    engine.submit(0, _job(_chat(0, max_tokens=40)))
    engine.step()
    engine.cancel(0, timed_out=True)
    assert isinstance(_drain(engine)[0][1], JobTimeout)


def test_streamed_pieces_add_up_to_the_result_and_never_show_a_stop_sequence(tiny_lm: Any) -> None:
    from mlx_fusion.registry.kinds import lm

    engine = lm.BatchEngine(tiny_lm, 8)
    document = _chat(1, max_tokens=30, stop=["or"])
    engine.submit(0, _job(document), stream=True)
    pieces: list[str] = []
    result = None
    while engine.busy:
        for event in engine.step():
            if event.type == "token":
                assert event.payload["produced_at"] <= time.time()
                pieces.append(event.payload["text"])
            else:
                result = event.payload[0]
    assert result is not None
    content = result["choices"][0]["message"]["content"]
    assert "".join(pieces) == content
    assert _same(result, lm.run(tiny_lm, _job(document))[0])


def _in_batch(engine: Any) -> set[int]:
    return set(engine._sequences)


class _Clock:
    """The batch engine's clock, moved by the test (``time()`` stays real)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    from mlx_fusion.registry.kinds import lm_batch

    fake = _Clock()
    monkeypatch.setattr(lm_batch, "time", fake)
    return fake


def test_jobs_arriving_one_after_another_join_the_batch_together_once_arrivals_pause(
    tiny_lm: Any, clock: _Clock
) -> None:
    from mlx_fusion.registry.kinds import lm, lm_batch

    quiet = lm_batch.JOIN_QUIET_S
    engine = lm.BatchEngine(tiny_lm, 8)
    engine.submit(0, _job(_chat(0, max_tokens=40)))  # alone
    for tag in (1, 2, 3):  # arrivals closer than the quiet time: they wait, the first goes on
        clock.now += quiet / 2
        engine.submit(tag, _job(_chat(tag)))
        engine.step()
        assert engine._alone is not None and _in_batch(engine) == set()
    clock.now += quiet / 2
    engine.step()
    assert _in_batch(engine) == set()
    clock.now += quiet  # quiet long enough: all of them join, with the first, in one pass
    engine.step()
    assert engine._alone is None and _in_batch(engine) == {0, 1, 2, 3}
    ended = _drain(engine)
    for tag in (1, 2, 3):
        assert _same(ended[tag][1][0], lm.run(tiny_lm, _job(_chat(tag)))[0])


def test_a_waiting_job_joins_once_it_waited_the_hold_or_fills_the_batch(
    tiny_lm: Any, clock: _Clock
) -> None:
    from mlx_fusion.registry.kinds import lm, lm_batch

    engine = lm.BatchEngine(tiny_lm, 64)
    engine.submit(0, _job(_chat(0, max_tokens=40)))
    tag = 1
    while clock.now - 1000.0 < lm_batch.JOIN_HOLD_S:  # arrivals never pause
        engine.submit(tag, _job(_chat(tag)))
        engine.step()
        assert _in_batch(engine) == set()
        clock.now += lm_batch.JOIN_QUIET_S / 2
        tag += 1
    engine.step()  # the first to wait waited the hold: every waiting job joins
    assert _in_batch(engine) == set(range(tag))
    _drain(engine)
    full = lm.BatchEngine(tiny_lm, 2)
    full.submit(0, _job(_chat(0, max_tokens=40)))
    full.submit(1, _job(_chat(1)))  # with the one running, the batch is full: no waiting
    full.step()
    assert _in_batch(full) == {0, 1}


def test_a_waiting_job_can_be_cancelled_and_the_others_go_on(tiny_lm: Any) -> None:
    from mlx_fusion.registry.kinds import lm

    engine = lm.BatchEngine(tiny_lm, 8)
    engine.submit(0, _job(_chat(0, max_tokens=30)))
    engine.submit(1, _job(_chat(1)))
    engine.submit(2, _job(_chat(2)))
    engine.cancel(1)
    ended = _drain(engine)
    assert isinstance(ended[1][1], JobCancelled)
    for tag in (0, 2):
        document = _chat(tag, max_tokens=30) if tag == 0 else _chat(tag)
        assert _same(ended[tag][1][0], lm.run(tiny_lm, _job(document))[0])


def test_prompts_prefilled_in_small_chunks_give_their_unbatched_results(
    tiny_lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_fusion.registry.kinds import lm, lm_batch

    monkeypatch.setattr(lm_batch, "PREFILL_TOKENS", 12)
    monkeypatch.setattr(lm_batch, "_PREFILL_CHUNK_TOKENS", (3, 2048))
    engine = lm.BatchEngine(tiny_lm, 8)
    engine._may_run_alone = False  # every job through the batch's prefill
    documents = {n: _chat(n) for n in range(4)}
    for n, document in documents.items():
        engine.submit(n, _job(document))
    engine.step()
    assert engine._generator.prefill_step_size == 3  # 12 tokens / 4 prompts
    ended = _drain(engine)
    for n, document in documents.items():
        assert _same(ended[n][1][0], lm.run(tiny_lm, _job(document))[0]), n


def test_a_shared_prompt_prefix_is_reused_with_the_same_result(tiny_lm: Any) -> None:
    from mlx_fusion.registry.kinds import lm

    system = {"role": "system", "content": "You are a careful assistant. " * 6}

    def turn(n: int) -> dict[str, Any]:
        document = _chat(n)
        document["input"]["messages"].insert(0, system)
        return document

    engine = lm.BatchEngine(tiny_lm, 8)
    engine.submit(0, _job(turn(0)))
    first = _drain(engine)[0][1]
    engine.submit(1, _job(turn(1)))
    second = _drain(engine)[0 + 1][1]
    assert first[1]["cached_prompt_tokens"] == 0
    assert second[1]["cached_prompt_tokens"] > 40  # the system prompt came from the cache
    assert _same(second[0], lm.run(tiny_lm, _job(turn(1)))[0])
    assert 0 < engine.prompt_cache.nbytes <= engine._cache_bytes


def test_the_prompt_cache_stays_within_its_byte_bound(tiny_model_dir: Path) -> None:
    from mlx_fusion.registry.kinds import lm

    one_entry = lm.load(
        ModelSpec(id="tiny", kind="lm", path=tiny_model_dir, prompt_cache_bytes=40_000)
    )
    engine = lm.BatchEngine(one_entry, 8)
    for n in range(4):
        engine.submit(n, _job(_chat(n, max_tokens=20)))
    assert all(kind == "done" for kind, _ in _drain(engine).values())
    assert engine.prompt_cache.nbytes <= 40_000
    off = lm.load(ModelSpec(id="tiny", kind="lm", path=tiny_model_dir, prompt_cache_bytes=0))
    engine = lm.BatchEngine(off, 8)
    engine.submit(0, _job(_chat(0)))
    _drain(engine)
    engine.submit(1, _job(_chat(0)))
    assert _drain(engine)[1][1][1]["cached_prompt_tokens"] == 0
    assert len(engine.prompt_cache) == 0


# ----- a batching model process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_process(tiny_model_dir: Path) -> Any:
    spec = ModelSpec(id="tiny", kind="lm", path=tiny_model_dir)
    process = ModelProcess(spec, LM_KIND, max_input_bytes=1 << 20, max_batch=8)
    process.start(120)
    assert process.batching
    yield process
    process.stop(2)


def _in_threads(process: ModelProcess, documents: list[dict[str, Any]], **kw: Any) -> list[Any]:
    out: list[Any] = [None] * len(documents)
    requests = [Request() for _ in documents]

    def one(n: int) -> None:
        try:
            out[n] = process.run(documents[n], kw.get("timeouts", {}).get(n), requests[n])
        except Exception as e:
            out[n] = e

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(documents))]
    for thread in threads:
        thread.start()
    if "cancel" in kw:
        time.sleep(0.3)
        process.cancel(requests[kw["cancel"]])
    for thread in threads:
        thread.join(60)
    return out


def test_jobs_sent_from_many_threads_run_together_in_one_model_process(
    batch_process: Any, tiny_lm: Any
) -> None:
    from mlx_fusion.registry.kinds import lm

    documents = [_chat(n) for n in range(6)]
    results = _in_threads(batch_process, documents)
    for n, (result, _, memory) in enumerate(results):
        assert _same(result, lm.run(tiny_lm, _job(documents[n]))[0])
        assert memory.rss_bytes > 0
    assert max(m["batch_size"] for _, m, _ in results) > 1


def test_one_cancelled_or_timed_out_job_ends_alone_and_the_process_lives_on(
    batch_process: Any, tiny_lm: Any
) -> None:
    from mlx_fusion.registry.kinds import lm

    long = {**_chat(0), "input": {**_chat(0)["input"], "max_tokens": 4000, "stop": None}}
    documents = [long, dict(long, id="job-1"), _chat(2)]
    results = _in_threads(batch_process, documents, timeouts={1: 0.5}, cancel=0)
    assert isinstance(results[0], JobCancelled)
    assert isinstance(results[1], JobTimeout)
    assert _same(results[2][0], lm.run(tiny_lm, _job(_chat(2)))[0])
    assert batch_process.alive


def test_a_model_process_that_dies_fails_every_job_in_its_batch(tiny_model_dir: Path) -> None:
    spec = ModelSpec(id="tiny", kind="lm", path=tiny_model_dir)
    process = ModelProcess(spec, LM_KIND, max_input_bytes=1 << 20, max_batch=4)
    process.start(120)
    long = {**_chat(0), "input": {**_chat(0)["input"], "max_tokens": 4000}}
    killer = threading.Timer(0.5, process.kill)
    killer.start()
    results = _in_threads(process, [long, dict(long, id="job-1")])
    killer.join()
    assert all(isinstance(r, ModelCrashed) for r in results), results
    assert not process.alive
    with pytest.raises(ModelCrashed):
        process.run(_chat(1))


# ----- through a real worker --------------------------------------------------------------------


def _worker_run(
    tmp_path: Path,
    redis_url: str,
    redis: Redis,
    store: JobStore,
    catalog: Path,
    documents: list[dict[str, Any]],
    many: bool = False,
    **settings: Any,
) -> tuple[Client, Any]:
    s = worker_settings(redis_url, tmp_path / "data", catalog, **settings)
    client = Client(s, redis, store)
    if many:
        assert client.submit_many(documents) == [d["id"] for d in documents]
    else:
        for document in documents:
            client.submit(document)
    worker = build_worker(s, redis, store)
    worker.work(burst=True)
    return client, worker


def test_waiting_jobs_of_one_model_run_as_one_batch_through_the_worker(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, tiny_model_dir: Path
) -> None:
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    catalog = write_catalog(
        tmp_path / "models.toml", {"tiny": {"kind": "lm", "path": tiny_model_dir}}
    )
    bad = _chat(
        9,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="required",
    )
    # the first job (the leader) runs long enough for the others to be claimed beside it
    documents = [_chat(0, stream=True, max_tokens=150)] + [_chat(n) for n in range(1, 6)] + [bad]
    client, worker = _worker_run(
        tmp_path, redis_url, redis, store, catalog, documents, max_batch_size=8
    )
    records = {d["id"]: client.get(d["id"]) for d in documents}
    assert records[bad["id"]]["status"] == "failed"
    assert records[bad["id"]]["error"]["code"] == "invalid_input"
    for document in documents[:-1]:
        record = records[document["id"]]
        assert record["status"] == "completed", record
        assert record["worker"] == worker.name
    assert max(records[d["id"]]["metrics"].get("batch_size", 1) for d in documents[:-1]) > 1
    # RQ's bookkeeping: everything finished or failed, nothing left started or queued
    for q in worker.queues:
        assert q.count == 0
        assert StartedJobRegistry(q.name, connection=redis).count == 0
    finished = sum(FinishedJobRegistry(q.name, connection=redis).count for q in worker.queues)
    failed = sum(FailedJobRegistry(q.name, connection=redis).count for q in worker.queues)
    assert (finished, failed) == (6, 1)
    # the streamed job's chunks add up to its result
    chunks = list(client.stream(documents[0]["id"], timeout_s=5))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == records[documents[0]["id"]]["result"]["choices"][0]["message"]["content"]
    assert (
        chunks[-1]["choices"][0]["finish_reason"]
        == records[documents[0]["id"]]["result"]["choices"][0]["finish_reason"]
    )


def test_a_batch_stays_open_while_its_leader_runs_and_closes_after_the_maintenance_interval(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, tiny_model_dir: Path
) -> None:
    from mlx_fusion.batch_session import BatchSession

    catalog = write_catalog(
        tmp_path / "models.toml", {"tiny": {"kind": "lm", "path": tiny_model_dir}}
    )
    s = worker_settings(redis_url, tmp_path / "data", catalog, recovery_interval_s=1)
    session = BatchSession(build_worker(s, redis, store), "tiny", 8)
    assert session._may_claim()
    session._started -= 2 * s.maintenance_interval_s("gpu")  # an old session
    assert session._may_claim()  # its leader still runs: newcomers may join
    session._leader_running = False
    assert not session._may_claim()  # let it drain, so the worker's maintenance runs


def test_batched_results_through_the_worker_equal_one_at_a_time(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "models.toml", {"tiny": {"kind": "lm", "path": tiny_model_dir}}
    )
    documents = [_chat(n) for n in range(5)]
    client, _ = _worker_run(
        tmp_path / "a", redis_url, redis, store, catalog, documents, many=True, max_batch_size=8
    )
    batched = {d["id"]: client.get(d["id"])["result"] for d in documents}
    redis.flushdb()
    other = [dict(d, id=d["id"] + "-serial") for d in documents]
    client, _ = _worker_run(
        tmp_path / "b", redis_url, redis, store, catalog, other, max_batch_size=1
    )
    for d in documents:
        serial = client.get(d["id"] + "-serial")
        assert serial["metrics"].get("batch_size") is None  # really one at a time
        result = {**serial["result"], "id": batched[d["id"]]["id"]}
        assert _same(result, batched[d["id"]])


def test_waiting_embedding_jobs_share_forward_passes_through_the_worker(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore
) -> None:
    from mlx_fusion.registry.kinds.embeddings import minilm_dir

    catalog = write_catalog(
        tmp_path / "models.toml", {"minilm": {"kind": "embeddings", "path": minilm_dir()}}
    )
    texts = [
        "The cat sits on the mat.",
        "A feline rests on a rug.",
        "Stocks fell today.",
        "Hi",
        "Paris is in France.",
    ]
    documents = [
        {
            "id": f"emb-{n}",
            "kind": "embedding",
            "model": "minilm",
            "input": {"input": [text, text.upper()]},
        }
        for n, text in enumerate(texts)
    ]
    client, _ = _worker_run(
        tmp_path / "a", redis_url, redis, store, catalog, documents, max_batch_size=8
    )
    batched = {d["id"]: client.get(d["id"]) for d in documents}
    assert all(r["status"] == "completed" for r in batched.values())
    assert max(r["metrics"]["batch_jobs"] for r in batched.values()) > 1
    redis.flushdb()
    serial = [dict(d, id=d["id"] + "-serial") for d in documents]
    client, _ = _worker_run(
        tmp_path / "b", redis_url, redis, store, catalog, serial, max_batch_size=1
    )
    for d in documents:
        alone = client.get(d["id"] + "-serial")["result"]
        together = batched[d["id"]]["result"]
        assert alone["usage"] == together["usage"]
        for a, b in zip(alone["data"], together["data"], strict=True):
            assert a["index"] == b["index"]
            assert (
                max(abs(x - y) for x, y in zip(a["embedding"], b["embedding"], strict=True)) < 1e-5
            )


def test_a_cancel_that_comes_before_the_job_is_sent_still_ends_it(batch_process: Any) -> None:
    request = Request()
    batch_process.cancel(request)  # the runner attached the lease; the job is not sent yet
    long = {**_chat(0), "input": {**_chat(0)["input"], "max_tokens": 4000}}
    with pytest.raises(JobCancelled):
        batch_process.run(long, 60, request)
    assert batch_process.alive


@pytest.mark.parametrize(
    "document",
    [{"kind": [], "model": "tiny"}, {"kind": "chat.completion", "model": ["tiny"]}, [], None],
)
def test_a_document_of_any_shape_opens_no_batch_and_raises_nothing(
    tmp_path: Path,
    redis_url: str,
    redis: Redis,
    store: JobStore,
    tiny_model_dir: Path,
    document: Any,
) -> None:
    from mlx_fusion.batch_session import BatchSession

    catalog = write_catalog(
        tmp_path / "models.toml", {"tiny": {"kind": "lm", "path": tiny_model_dir}}
    )
    worker = build_worker(worker_settings(redis_url, tmp_path / "data", catalog), redis, store)
    with BatchSession.open(worker, document) as session:
        assert session is None


# ----- submitting many jobs at once -------------------------------------------------------------


def _rq_fields(redis: Redis, job_id: str) -> dict[bytes, bytes]:
    fields = redis.hgetall(f"rq:job:{job_id}")
    return {k: v for k, v in fields.items() if k not in {b"created_at", b"enqueued_at", b"data"}}


def test_submit_many_enqueues_each_job_as_submit_does(client: Client, redis: Redis) -> None:
    from rq.job import Job as RQJob
    from rq.serializers import JSONSerializer

    client.submit(_chat(1))
    assert client.submit_many([_chat(2), {**_chat(3), "priority": "high"}]) == ["job-2", "job-3"]
    one, two = _rq_fields(redis, "job-1"), _rq_fields(redis, "job-2")
    assert one.keys() == two.keys()
    assert {k: v for k, v in one.items() if k != b"description"} == {
        k: v for k, v in two.items() if k != b"description"
    }
    queued = {q: redis.lrange(f"rq:queue:{q}", 0, -1) for q in ("fusion:default", "fusion:high")}
    assert queued == {"fusion:default": [b"job-1", b"job-2"], "fusion:high": [b"job-3"]}
    job = RQJob.fetch("job-2", connection=redis, serializer=JSONSerializer)
    assert job.args[0]["input"] == _chat(2)["input"] and job.meta == {"model": "tiny"}
    assert client.get("job-3")["status"] == "queued"


def test_submit_many_submits_nothing_when_one_job_is_invalid(client: Client, redis: Redis) -> None:
    from mlx_fusion.errors import JobValidationError

    bad = {**_chat(2), "kind": "nonsense"}
    with pytest.raises(JobValidationError):
        client.submit_many([_chat(1), bad])
    assert client.get("job-1") is None
    assert redis.llen("rq:queue:fusion:default") == 0


def test_submit_many_returns_the_first_id_for_a_known_idempotency_key(
    client: Client, redis: Redis
) -> None:
    first = client.submit({**_chat(1), "idempotency_key": "k"})
    again = {**_chat(1), "id": "job-other", "idempotency_key": "k"}
    assert client.submit_many([again, _chat(2)]) == [first, "job-2"]
    assert redis.lrange("rq:queue:fusion:default", 0, -1) == [first.encode(), b"job-2"]
