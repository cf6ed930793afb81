"""``mlx_fusion.inspect``: the data behind ``mlx-fusion status`` and ``stats``, read from a real
Redis (real RQ queues, registries and worker hashes) and job stores on every backend."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import slow_kind
from conftest import write_catalog
from redis import Redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import utcformat
from rq.worker import SimpleWorker

from mlx_fusion import control, inspect
from mlx_fusion.config import Settings
from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.jobs import JobSpec, JobStore, utcnow
from mlx_fusion.registry import Catalog, ModelKind, ModelRegistry

T0 = utcnow().replace(microsecond=0)
"""Recent: a record finished at T0 expires (retention) a week after it, and backends apply TTLs."""


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        mongo_url="mongomock://",
        data_dir=tmp_path / "data",
        _env_file=None,  # type: ignore[call-arg]
    )


def queue(redis: Redis, name: str) -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer)


def enqueue(redis: Redis, name: str, enqueued_at: dt.datetime | None = None) -> Job:
    job = queue(redis, name).enqueue_call(func=JOB_FUNCTION, args=({"kind": "completion"},))
    if enqueued_at is not None:
        redis.hset(job.key, "enqueued_at", utcformat(enqueued_at))
    return job


def by_name(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in rows if r["name"] == name)


# --- queues -------------------------------------------------------------------------------------


def test_queue_status_lists_every_job_queue_then_the_webhook_queue(
    redis: Redis, settings: Settings
) -> None:
    names = [q["name"] for q in inspect.queue_status(redis, settings, T0)]
    assert names == ["fusion:high", "fusion:default", "fusion:low", "fusion:webhooks"]


def test_queue_depth_and_oldest_age_match_what_was_enqueued(
    redis: Redis, settings: Settings
) -> None:
    enqueue(redis, "fusion:default", at(0))
    enqueue(redis, "fusion:default", at(30))
    enqueue(redis, "fusion:default", at(60))
    row = by_name(inspect.queue_status(redis, settings, at(100)), "fusion:default")
    assert row["depth"] == 3 and row["oldest_age_s"] == 100.0


def test_an_empty_queue_has_no_oldest_age(redis: Redis, settings: Settings) -> None:
    row = by_name(inspect.queue_status(redis, settings, T0), "fusion:high")
    assert row == {
        "name": "fusion:high",
        "depth": 0,
        "oldest_age_s": None,
        "started": 0,
        "scheduled": 0,
        "failed": 0,
    }


def test_queue_status_reports_rq_started_scheduled_and_failed_counts(
    redis: Redis, settings: Settings
) -> None:
    enqueue(redis, "fusion:default")
    # outside a FusionWorker run_job raises: a real RQ failure
    SimpleWorker(["fusion:default"], connection=redis, serializer=JSONSerializer).work(burst=True)
    running = enqueue(redis, "fusion:default")
    with redis.pipeline() as pipe:
        Execution.create(running, ttl=60, pipeline=pipe)
        pipe.execute()
    queue(redis, "fusion:default").enqueue_in(
        dt.timedelta(minutes=5), JOB_FUNCTION, {"kind": "completion"}
    )
    row = by_name(inspect.queue_status(redis, settings, T0), "fusion:default")
    assert (row["depth"], row["started"], row["scheduled"], row["failed"]) == (1, 1, 1, 1)


def test_queue_status_leaves_an_expired_execution_where_it_is(
    redis: Redis, settings: Settings
) -> None:
    job = enqueue(redis, "fusion:default")
    with redis.pipeline() as pipe:
        Execution.create(job, ttl=0, pipeline=pipe)  # expired at once: RQ's cleanup would fail it
        pipe.execute()
    row = by_name(inspect.queue_status(redis, settings, T0), "fusion:default")
    assert row["started"] == 1 and row["failed"] == 0
    assert StartedJobRegistry("fusion:default", connection=redis).get_job_count(cleanup=False) == 1
    assert FailedJobRegistry("fusion:default", connection=redis).get_job_count(cleanup=False) == 0


def test_oldest_age_is_read_from_the_hash_field_whatever_the_payload(
    redis: Redis, settings: Settings
) -> None:
    job = enqueue(redis, "fusion:low", at(0))
    redis.hset(job.key, "data", b"\x80\x04 not json, not a pickle either")
    row = by_name(inspect.queue_status(redis, settings, at(7)), "fusion:low")
    assert row["oldest_age_s"] == 7.0


@pytest.mark.parametrize(
    "hostile",
    ["no hash", "garbage hash", "not a hash", "undecodable id"],
)
def test_a_hostile_head_entry_gives_no_age_and_does_not_break_queue_status(
    redis: Redis, settings: Settings, hostile: str
) -> None:
    enqueue(redis, "fusion:default", at(0))
    head = b"\xff\xfe" if hostile == "undecodable id" else b"hostile-1"
    if hostile == "garbage hash":
        redis.hset(b"rq:job:" + head, mapping={"data": b"\x00\xff", "enqueued_at": "yesterday"})
    elif hostile == "not a hash":
        redis.set(b"rq:job:" + head, b"a string")
    redis.lpush("rq:queue:fusion:default", head)
    rows = inspect.queue_status(redis, settings, at(10))
    row = by_name(rows, "fusion:default")
    assert row["depth"] == 2 and row["oldest_age_s"] is None
    assert len(rows) == 4


# --- workers ------------------------------------------------------------------------------------


def register(redis: Redis, name: str, queues: list[str]) -> SimpleWorker:
    worker = SimpleWorker(queues, name=name, connection=redis, serializer=JSONSerializer)
    worker.register_birth()  # type: ignore[no-untyped-call]
    return worker


def test_a_worker_on_the_job_queues_is_listed_as_gpu_with_its_rq_state(
    redis: Redis, settings: Settings
) -> None:
    worker = register(redis, "gpu-1", settings.queue_names())
    worker.set_state("busy")
    worker.set_current_job_id("job-7")
    assert worker.last_heartbeat is not None and worker.birth_date is not None
    now = worker.last_heartbeat + dt.timedelta(seconds=3)
    [row] = inspect.worker_status(redis, settings, now)
    assert row["name"] == "gpu-1" and row["kind"] == "gpu"
    assert row["state"] == "busy" and row["current_job"] == "job-7"
    assert row["queues"] == settings.queue_names()
    assert row["heartbeat_age_s"] == 3.0
    assert row["last_heartbeat"] == worker.last_heartbeat.isoformat()
    assert row["birth"] == worker.birth_date.isoformat()
    assert row["pid"] == worker.pid and row["hostname"] == worker.hostname


def test_a_worker_only_on_the_webhook_queue_is_listed_as_webhook_without_models(
    redis: Redis, settings: Settings
) -> None:
    register(redis, "hooks-1", [settings.webhook_queue_name()])
    [row] = inspect.worker_status(redis, settings, T0)
    assert row["kind"] == "webhook"
    assert (row["models"], row["used_bytes"], row["budget_bytes"]) == (None, None, None)


def test_workers_of_other_queues_are_not_listed(redis: Redis, settings: Settings) -> None:
    register(redis, "ours", [settings.queue_name("low")])
    register(redis, "theirs", ["other:default"])
    assert [w["name"] for w in inspect.worker_status(redis, settings, T0)] == ["ours"]


def test_a_gpu_worker_without_a_snapshot_has_no_models(redis: Redis, settings: Settings) -> None:
    register(redis, "gpu-1", settings.queue_names())
    [row] = inspect.worker_status(redis, settings, T0)
    assert (row["models"], row["used_bytes"], row["budget_bytes"]) == (None, None, None)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    """A real registry (stand-in kind, in process) with model ``m1`` of 1000 bytes loaded."""
    model_dir = tmp_path / "m1"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"x" * 1000)
    entries = {"m1": {"kind": "lm", "path": model_dir}}
    catalog = Catalog.load(write_catalog(tmp_path / "models.toml", entries))
    s = Settings(
        registry_mode="inprocess",
        memory_budget_bytes=10**9,
        _env_file=None,  # type: ignore[call-arg]
    )
    built = ModelRegistry(catalog, s, kinds={ModelKind.LM: slow_kind})
    built.load("m1")
    yield built
    built.close()


def test_a_published_snapshot_shows_the_workers_models_and_memory(
    redis: Redis, settings: Settings, registry: ModelRegistry
) -> None:
    register(redis, "gpu-1", settings.queue_names())
    control.ControlLoop(redis, settings.queue_prefix, "gpu-1", registry).publish()
    [row] = inspect.worker_status(redis, settings, T0)
    # the registry counts the weights' size, or what MLX measured if this process imported it
    size = registry.snapshot()["models"][0]["bytes"]
    assert size > 0
    assert row["models"] == [{"id": "m1", "state": "ready", "bytes": size, "in_use": 0}]
    assert (row["used_bytes"], row["budget_bytes"]) == (size, 10**9)


def test_a_snapshot_that_is_not_json_shows_the_worker_without_models(
    redis: Redis, settings: Settings
) -> None:
    register(redis, "gpu-1", settings.queue_names())
    redis.set(control.snapshot_key(settings.queue_prefix, "gpu-1"), b"{not json")
    [row] = inspect.worker_status(redis, settings, T0)
    assert row["name"] == "gpu-1" and row["models"] is None


# --- failures and the whole status ---------------------------------------------------------------


def spec(job_id: str, kind: str = "completion", model: str = "m1") -> JobSpec:
    return JobSpec.model_validate(
        {"id": job_id, "kind": kind, "model": model, "input": {"prompt": "p"}}
    )


def failed_job(store: JobStore, job_id: str, finished: float, code: str = "timeout") -> None:
    store.insert(spec(job_id), now=at(finished - 1))
    store.fail(job_id, {"code": code, "message": f"{job_id} failed"}, now=at(finished))


def test_recent_failures_are_the_latest_failed_jobs_newest_first(store: JobStore) -> None:
    for i in range(4):
        failed_job(store, f"f{i}", finished=10 + i)
    store.insert(spec("ok"), now=at(20))
    assert [f["id"] for f in inspect.recent_failures(store, limit=3)] == ["f3", "f2", "f1"]


def test_a_recent_failure_carries_model_kind_time_and_error(store: JobStore) -> None:
    failed_job(store, "f1", finished=10, code="model_not_found")
    assert inspect.recent_failures(store) == [
        {
            "id": "f1",
            "model": "m1",
            "kind": "completion",
            "finished_at": at(10).isoformat(),
            "code": "model_not_found",
            "message": "f1 failed",
        }
    ]


def test_status_gathers_queues_workers_and_failures(
    redis: Redis, settings: Settings, store: JobStore
) -> None:
    enqueue(redis, "fusion:high", at(0))
    register(redis, "gpu-1", settings.queue_names())
    failed_job(store, "f1", finished=5)
    result = inspect.status(redis, settings, store, at(10))
    assert result["at"] == at(10).isoformat()
    assert by_name(result["queues"], "fusion:high")["oldest_age_s"] == 10.0
    assert [w["name"] for w in result["workers"]] == ["gpu-1"]
    assert [f["id"] for f in result["recent_failures"]] == ["f1"]


@pytest.fixture
def down_store(free_port: int) -> Iterator[JobStore]:
    """A store on a real pymongo client whose server is not there (nothing listens on the port)."""
    client: Any = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{free_port}/",
        serverSelectionTimeoutMS=200,
        connectTimeoutMS=200,
        tz_aware=True,
    )
    yield JobStore(client["fusion"]["jobs"])
    client.close()


def test_a_store_that_is_down_gives_an_error_part_not_an_exception(
    redis: Redis, settings: Settings, down_store: JobStore
) -> None:
    result = inspect.status(redis, settings, down_store, T0)
    assert result["recent_failures"]["error"].startswith("JobStoreError: ")
    assert isinstance(result["queues"], list) and isinstance(result["workers"], list)


def test_a_redis_that_is_down_gives_error_parts_not_an_exception(
    settings: Settings, store: JobStore, free_port: int
) -> None:
    down = Redis.from_url(f"redis://127.0.0.1:{free_port}/0", socket_connect_timeout=0.2)
    result = inspect.status(down, settings, store, T0)
    assert result["queues"]["error"].startswith("ConnectionError: ")
    assert result["workers"]["error"].startswith("ConnectionError: ")
    assert result["recent_failures"] == []


# --- percentile ---------------------------------------------------------------------------------


def test_percentile_of_an_empty_list_is_none() -> None:
    assert inspect.percentile([], 50) is None


def test_percentile_of_one_value_is_that_value_for_every_rank() -> None:
    assert [inspect.percentile([7.0], q) for q in (0, 1, 50, 99, 100)] == [7.0] * 5


def test_percentile_is_the_nearest_rank_of_a_known_list() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]  # the textbook nearest-rank example
    assert [inspect.percentile(values, q) for q in (5, 30, 40, 50, 100)] == [
        15.0,
        20.0,
        20.0,
        35.0,
        50.0,
    ]


def test_percentile_rounds_the_rank_up_never_interpolates() -> None:
    values = [float(v) for v in range(1, 11)]
    assert [inspect.percentile(values, q) for q in (50, 51, 95, 99)] == [5.0, 6.0, 10.0, 10.0]


def test_percentile_outside_0_to_100_is_refused() -> None:
    with pytest.raises(ValueError):
        inspect.percentile([1.0], 101)


# --- job_stats ----------------------------------------------------------------------------------


def completed_job(
    store: JobStore,
    job_id: str,
    created: float,
    finished: float,
    metrics: dict[str, Any] | None = None,
    *,
    kind: str = "chat.completion",
    model: str = "m1",
) -> None:
    store.insert(spec(job_id, kind, model), now=at(created))
    store.start(job_id, "w", now=at(created + 0.1))
    store.complete(job_id, {"ok": True}, metrics or {}, now=at(finished))


@pytest.fixture
def finished_jobs(any_store: JobStore) -> JobStore:
    """In the window [0, 100) s: four completed chat jobs on m1 (latency k s, queue wait 0.1k s,
    inference 0.5k s, 10k tokens, k = 1..4), one failed and one cancelled on m1, one completed
    embedding on e1 (no completion tokens), one record with no kind or model."""
    for k in range(1, 5):
        metrics = {"queue_wait_ms": 100 * k, "inference_ms": 500 * k, "completion_tokens": 10 * k}
        completed_job(any_store, f"c{k}", created=10 * k, finished=10 * k + k, metrics=metrics)
    any_store.insert(spec("fail", "chat.completion"), now=at(50))
    any_store.start("fail", "w", now=at(51))
    any_store.fail("fail", {"code": "timeout", "message": "slow"}, now=at(55))
    any_store.insert(spec("gone", "chat.completion"), now=at(60))
    any_store.cancel("gone", now=at(61))
    completed_job(
        any_store,
        "emb",
        created=70,
        finished=71,
        metrics={"inference_ms": 20, "prompt_tokens": 9},
        kind="embedding",
        model="e1",
    )
    any_store.fail("bad", {"code": "invalid_job", "message": "not JSON"}, now=at(80))
    return any_store


def group(stats: dict[str, Any], kind: str, model: str) -> dict[str, Any]:
    return next(g for g in stats["groups"] if (g["kind"], g["model"]) == (kind, model))


def test_job_stats_counts_jobs_by_status_per_kind_and_model(finished_jobs: JobStore) -> None:
    stats = inspect.job_stats(finished_jobs, at(0), at(100))
    counts = [
        (g["kind"], g["model"], g["count"], g["completed"], g["failed"], g["cancelled"])
        for g in [*stats["groups"], stats["total"]]
    ]
    assert counts == [
        ("-", "-", 1, 0, 1, 0),
        ("chat.completion", "m1", 6, 4, 1, 1),
        ("embedding", "e1", 1, 1, 0, 0),
        ("*", "*", 8, 5, 2, 1),
    ]
    assert stats["truncated"] is False


def test_job_stats_throughput_is_completed_jobs_per_second_of_the_window(
    finished_jobs: JobStore,
) -> None:
    stats = inspect.job_stats(finished_jobs, at(0), at(100))
    assert stats["window_s"] == 100.0
    assert group(stats, "chat.completion", "m1")["throughput_per_s"] == pytest.approx(0.04)
    assert stats["total"]["throughput_per_s"] == pytest.approx(0.05)


def test_job_stats_latency_is_nearest_rank_of_finish_minus_creation_of_completed_jobs(
    finished_jobs: JobStore,
) -> None:
    chat = group(inspect.job_stats(finished_jobs, at(0), at(100)), "chat.completion", "m1")
    assert chat["latency_s"] == {"p50": 2.0, "p95": 4.0, "p99": 4.0}


def test_job_stats_queue_wait_and_inference_percentiles_come_from_the_metrics(
    finished_jobs: JobStore,
) -> None:
    chat = group(inspect.job_stats(finished_jobs, at(0), at(100)), "chat.completion", "m1")
    assert chat["queue_wait_s"] == pytest.approx({"p50": 0.2, "p95": 0.4, "p99": 0.4})
    assert chat["inference_s"] == pytest.approx({"p50": 1.0, "p95": 2.0, "p99": 2.0})


def test_job_stats_timings_are_none_for_a_group_without_completed_jobs(
    finished_jobs: JobStore,
) -> None:
    missing = group(inspect.job_stats(finished_jobs, at(0), at(100)), "-", "-")
    none = {"p50": None, "p95": None, "p99": None}
    assert missing["latency_s"] == missing["queue_wait_s"] == missing["inference_s"] == none


def test_job_stats_tokens_per_second_is_completion_tokens_over_inference_time(
    finished_jobs: JobStore,
) -> None:
    stats = inspect.job_stats(finished_jobs, at(0), at(100))
    assert group(stats, "chat.completion", "m1")["tokens_per_s"] == pytest.approx(100 / 5)
    assert group(stats, "embedding", "e1")["tokens_per_s"] is None


def test_job_stats_counts_jobs_finished_from_since_up_to_but_not_at_until(
    finished_jobs: JobStore,
) -> None:
    stats = inspect.job_stats(finished_jobs, at(22), at(55))  # c2 at 22 in, fail at 55 out
    assert [(g["model"], g["count"]) for g in stats["groups"]] == [("m1", 3)]


def test_job_stats_leaves_out_jobs_not_finished(any_store: JobStore) -> None:
    any_store.insert(spec("queued"), now=at(1))
    any_store.insert(spec("running"), now=at(1))
    any_store.start("running", "w", now=at(2))
    stats = inspect.job_stats(any_store, at(0), at(100))
    assert stats["groups"] == [] and stats["total"]["count"] == 0


def test_job_stats_reads_records_sharing_a_finish_time_across_pages_once(
    any_store: JobStore,
) -> None:
    for i in range(7):
        completed_job(any_store, f"same{i}", created=1, finished=5)
    completed_job(any_store, "later", created=1, finished=6)
    stats = inspect.job_stats(any_store, at(0), at(100), page_size=3)
    assert stats["total"]["count"] == 8 and stats["truncated"] is False


def test_job_stats_reports_truncated_when_more_jobs_finished_than_the_cap(
    any_store: JobStore,
) -> None:
    for i in range(5):
        completed_job(any_store, f"j{i}", created=1, finished=2 + i)
    stats = inspect.job_stats(any_store, at(0), at(100), max_records=3, page_size=2)
    assert stats["total"]["count"] == 3 and stats["truncated"] is True


def test_job_stats_is_not_truncated_when_exactly_the_cap_finished(any_store: JobStore) -> None:
    for i in range(3):
        completed_job(any_store, f"j{i}", created=1, finished=2 + i)
    stats = inspect.job_stats(any_store, at(0), at(100), max_records=3)
    assert stats["total"]["count"] == 3 and stats["truncated"] is False


def test_job_stats_refuses_a_window_that_ends_before_it_starts(store: JobStore) -> None:
    with pytest.raises(ValueError):
        inspect.job_stats(store, at(10), at(10))


# --- rendering ----------------------------------------------------------------------------------


def test_render_status_shows_each_part_and_an_unavailable_one_with_its_error(
    redis: Redis, settings: Settings, registry: ModelRegistry, down_store: JobStore
) -> None:
    enqueue(redis, "fusion:default", at(0))
    register(redis, "gpu-1", settings.queue_names())
    control.ControlLoop(redis, settings.queue_prefix, "gpu-1", registry).publish()
    data = inspect.status(redis, settings, down_store, at(42))
    text = inspect.render_status(data)
    rows = [line.split() for line in text.splitlines()]
    assert ["fusion:default", "1", "42.00s", "0", "0", "0"] in rows
    assert "gpu-1" in text and "m1 (ready, " in text  # its size depends on what MLX measured
    assert "Recent failures: unavailable (JobStoreError: job store operation failed" in text


def test_render_status_replaces_control_characters_of_producer_written_fields() -> None:
    failure = {
        "id": "j\x1b[2Jx",
        "model": "m",
        "kind": "completion",
        "finished_at": T0.isoformat(),
        "code": "invalid_job",
        "message": "bad\x07\nthing",
    }
    text = inspect.render_status(
        {"at": T0.isoformat(), "queues": [], "workers": [], "recent_failures": [failure]}
    )
    assert "\x1b" not in text and "\x07" not in text
    assert "j?[2Jx" in text and "bad??thing" in text


def test_render_stats_shows_a_row_per_group_and_the_totals(finished_jobs: JobStore) -> None:
    text = inspect.render_stats(inspect.job_stats(finished_jobs, at(0), at(100)))
    lines = text.splitlines()
    assert lines[0].startswith(f"Jobs finished from {at(0).isoformat()}")
    rows = [line.split() for line in lines[3:]]
    assert [r[:6] for r in rows] == [
        ["-", "-", "1", "0", "1", "0"],
        ["chat.completion", "m1", "6", "4", "1", "1"],
        ["embedding", "e1", "1", "1", "0", "0"],
        ["*", "*", "8", "5", "2", "1"],
    ]
    assert rows[1][7:] == ["2.00/4.00/4.00", "0.20/0.40/0.40", "1.00/2.00/2.00", "20.0"]
