"""Model-aware scheduling: jobs of loaded models first, the best model next, no job passed over
past the maximum wait, priorities kept. The worker and Redis are real; the model kind is the
``slow_kind`` stand-in (a model process each, loads counted by the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import slow_kind
from conftest import build_worker, worker_settings, write_catalog
from redis import Redis

from mlx_fusion.client import Client
from mlx_fusion.jobs.store import JobStore
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.scheduling import Waiting, choose, model_of_payload


def _w(model: str | None, waited_s: float = 0.0) -> Waiting:
    return Waiting(f"job-{model}", model, waited_s)


def _one_second(model: str) -> float:
    return 1.0


def test_the_head_runs_first_when_its_model_is_loaded() -> None:
    assert choose([_w("a"), _w("b")], {"a"}, max_wait_s=60, load_s=_one_second) == 0


def test_a_job_of_a_loaded_model_goes_before_jobs_that_need_a_load() -> None:
    waiting = [_w("b"), _w("c"), _w("a"), _w("a")]
    assert choose(waiting, {"a"}, max_wait_s=60, load_s=_one_second) == 2


def test_with_nothing_loaded_the_model_clearing_most_jobs_per_load_second_goes_first() -> None:
    waiting = [_w("b"), _w("a"), _w("a"), _w("c"), _w("c"), _w("c")]
    assert choose(waiting, set(), max_wait_s=60, load_s=_one_second) == 3
    slow_c = {"a": 1.0, "b": 1.0, "c": 10.0}
    assert choose(waiting, set(), max_wait_s=60, load_s=slow_c.__getitem__) == 1


def test_a_head_that_waited_past_the_maximum_runs_whatever_its_model() -> None:
    waiting = [_w("b", waited_s=61), _w("a")]
    assert choose(waiting, {"a"}, max_wait_s=60, load_s=_one_second) == 0


def test_a_head_whose_model_cannot_be_told_keeps_its_place() -> None:
    assert choose([_w(None), _w("a")], {"a"}, max_wait_s=60, load_s=_one_second) == 0


def test_the_model_is_read_from_a_raw_payload_compressed_or_not() -> None:
    import json
    import zlib

    raw = json.dumps(["mlx_fusion.worker.run_job", None, [{"model": "m"}], {}]).encode()
    assert model_of_payload(raw) == "m"
    assert model_of_payload(zlib.compress(raw)) == "m"
    assert model_of_payload(b"not json") is None
    assert model_of_payload(json.dumps(["f", None, [], {}]).encode()) is None


@pytest.fixture
def two_models(tmp_path: Path, tiny_model_dir: Path) -> Path:
    entry = {"kind": "lm", "path": tiny_model_dir, "keep_alive_s": -1}
    return write_catalog(tmp_path / "models.toml", {"model-a": entry, "model-b": entry})


def _run(
    tmp_path: Path,
    redis_url: str,
    redis: Redis,
    store: JobStore,
    catalog: Path,
    jobs: list[tuple[str, str]],
    junk: tuple[bytes | str, ...] = (),
    **settings: Any,
) -> tuple[list[str], int]:
    """Queue ``jobs`` ((model, priority)) and then the raw entries ``junk`` on the default
    queue, run a worker until the queues are empty; returns the models in the order they
    started, and how many loads the registry made."""
    s = worker_settings(redis_url, tmp_path / "data", catalog, max_loaded_models=1, **settings)
    client = Client(s, redis, store)
    ids = [
        client.submit({"kind": "completion", "model": m, "input": {"prompt": "x"}, "priority": p})
        for m, p in jobs
    ]
    if junk:
        redis.rpush("rq:queue:fusion:default", *junk)
    worker = build_worker(s, redis, store, {ModelKind.LM: slow_kind})
    try:
        worker.work(burst=True)
        loads = worker.runner.registry.snapshot()["stats"]["loads"]
    finally:
        worker.runner.registry.close()
    records = [store.get(i) or {} for i in ids]
    assert all(r.get("status") == "completed" for r in records), records
    order = sorted(records, key=lambda r: r["started_at"])
    return [r["model"] for r in order], loads


ALTERNATING = [("model-a", "default"), ("model-b", "default")] * 3


def test_a_mixed_queue_runs_each_models_jobs_together(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, two_models: Path
) -> None:
    order, loads = _run(tmp_path, redis_url, redis, store, two_models, ALTERNATING)
    assert order == ["model-a"] * 3 + ["model-b"] * 3
    assert loads == 2


def test_fifo_when_lookahead_is_off_loads_for_every_switch(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, two_models: Path
) -> None:
    order, loads = _run(
        tmp_path, redis_url, redis, store, two_models, ALTERNATING, schedule_lookahead=0
    )
    assert order == [m for m, _ in ALTERNATING]
    assert loads == 6


def test_no_job_is_passed_over_once_it_has_waited_the_maximum(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, two_models: Path
) -> None:
    order, _ = _run(
        tmp_path, redis_url, redis, store, two_models, ALTERNATING, schedule_max_wait_s=1e-6
    )
    assert order == [m for m, _ in ALTERNATING]


def test_priorities_hold_over_loaded_models(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, two_models: Path
) -> None:
    jobs = [("model-a", "default"), ("model-a", "default"), ("model-b", "high")]
    order, _ = _run(tmp_path, redis_url, redis, store, two_models, jobs)
    assert order == ["model-b", "model-a", "model-a"]


def test_a_load_evicts_a_model_no_waiting_job_names_before_the_least_recently_used(
    tmp_path: Path, redis_url: str, tiny_model_dir: Path
) -> None:
    from mlx_fusion.registry import Catalog, ModelRegistry

    entry = {"kind": "lm", "path": tiny_model_dir, "keep_alive_s": -1}
    catalog = write_catalog(
        tmp_path / "three.toml", {"model-a": entry, "model-b": entry, "model-c": entry}
    )
    s = worker_settings(redis_url, tmp_path / "data", catalog, max_loaded_models=2)
    registry = ModelRegistry(Catalog.load(catalog), s, kinds={ModelKind.LM: slow_kind})
    try:
        registry.load("model-a")
        registry.load("model-b")  # model-a is now the least recently used
        registry.waiting_models = lambda: frozenset({"model-a"})
        registry.load("model-c")
        assert sorted(registry.loaded()) == ["model-a", "model-c"]
        assert registry.snapshot()["evictions"][-1]["model"] == "model-b"
    finally:
        registry.close()


def test_the_scheduler_sees_the_models_waiting_in_every_queue(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, two_models: Path
) -> None:
    import time

    s = worker_settings(redis_url, tmp_path / "data", two_models)
    client = Client(s, redis, store)
    for model, priority in [("model-b", "high"), ("model-a", "low"), ("model-a", "high")]:
        client.submit(
            {"kind": "completion", "model": model, "input": {"prompt": "x"}, "priority": priority}
        )
    worker = build_worker(s, redis, store, {ModelKind.LM: slow_kind})
    try:
        keys = [q.key for q in worker._ordered_queues]
        moved = worker.model_scheduler.prepare(keys, time.time())
        assert moved is None  # nothing loaded: the head of fusion:high stays first
        assert worker.model_scheduler.waiting_models == {"model-a", "model-b"}
    finally:
        worker.runner.registry.close()


def test_hostile_queue_entries_do_not_stop_scheduling(
    tmp_path: Path, redis_url: str, redis: Redis, store: JobStore, two_models: Path
) -> None:
    jobs = [("model-a", "default"), ("model-b", "default"), ("model-a", "default")]
    junk = (b"\xff\xfe not an id", "no-such-job")
    order, loads = _run(tmp_path, redis_url, redis, store, two_models, jobs, junk)
    assert order == ["model-a", "model-a", "model-b"]
    assert loads == 2  # the junk did not turn scheduling off
