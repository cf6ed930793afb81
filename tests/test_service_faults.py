"""Services going away for real: a Redis with append-only persistence killed and restarted while
jobs are queued and running, a MongoDB that cannot be reached at submit, and one that goes away
while a job runs (a stand-in: a collection whose every call fails while it is "down", as pymongo's
do when the server is unreachable).

The worker is a real process (its model replaced by the stand-in kind); the store is the embedded
one it shares with the test (montydb in the data dir).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slow_kind
from conftest import (
    STAND_IN_WORKER,
    TINY_MODEL,
    RedisServer,
    build_worker,
    fusion_env,
    settings_from_env,
    unused_port,
    wait_for,
)
from pymongo.errors import ServerSelectionTimeoutError
from redis import Redis
from tcp_proxy import TcpProxy

from mlx_fusion.client import Client
from mlx_fusion.config import Settings
from mlx_fusion.errors import JobStoreError
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.jobs.spool import Spool
from mlx_fusion.jobs.store import JobStore
from mlx_fusion.registry.catalog import ModelKind


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always", "--save", ""
    )
    server.start()
    yield server
    server.stop()


def test_redis_killed_and_restarted_loses_no_queued_job_and_the_worker_reconnects(
    tmp_path: Path, catalog_path: Path, aof_redis: RedisServer
) -> None:
    env = fusion_env(tmp_path, aof_redis.url, catalog_path, FUSION_HEARTBEAT_INTERVAL_S="0.5")
    settings = settings_from_env(env)
    store = connect_store(settings)
    client = Client(settings, Redis.from_url(aof_redis.url), store)
    doc = {"kind": "completion", "model": TINY_MODEL, "input": {"prompt": "hi"}}
    ids = [client.submit({**doc, "metadata": {"sleep_s": "1"}}) for _ in range(6)]
    worker = subprocess.Popen(
        [sys.executable, "-c", STAND_IN_WORKER], env=env, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: store.get(ids[0])["status"] != "queued", 60, "the first job to start")  # type: ignore[index]
        aof_redis.kill()  # mid-job, with five jobs queued
        time.sleep(2)
        aof_redis.start()
        wait_for(
            lambda: all(store.get(i)["status"] == "completed" for i in ids),  # type: ignore[index]
            90,
            "every job to complete",
        )
        assert worker.poll() is None, "the worker stopped"
        later = client.submit({**doc, "metadata": {"sleep_s": "0"}})  # and it still takes work
        wait_for(lambda: store.get(later)["status"] == "completed", 30, "a job after the restart")  # type: ignore[index]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_submit_with_mongodb_unreachable_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, redis: Redis, redis_url: str
) -> None:
    closed = unused_port()
    settings = Settings(
        redis_url=redis_url,
        mongo_url=f"mongodb://127.0.0.1:{closed}/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
        data_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )
    with pytest.raises(JobStoreError) as info:
        store = connect_store(settings)
        Client(settings, redis, store).submit(
            {"kind": "completion", "model": TINY_MODEL, "input": {"prompt": "hi"}}
        )
    assert info.value.code == "store_unavailable"
    assert redis.keys("rq:job:*") == [] and redis.llen("rq:queue:fusion:default") == 0


@pytest.mark.parametrize("many", [False, True], ids=["submit", "submit_many"])
def test_submit_with_redis_unreachable_is_a_clear_error_and_the_records_fail(
    tmp_path: Path, store: JobStore, many: bool
) -> None:
    from mlx_fusion.client import EnqueueError

    closed = unused_port()  # nothing listens there: connections are refused at once
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{closed}/0",
        mongo_url="mongomock://",
        data_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )
    redis = Redis(host="127.0.0.1", port=closed, socket_connect_timeout=1)
    client = Client(settings, redis, store)
    documents = [
        {"id": f"lost-{n}", "kind": "completion", "model": TINY_MODEL, "input": {"prompt": "hi"}}
        for n in range(3 if many else 1)
    ]
    with pytest.raises(EnqueueError) as info:
        if many:
            client.submit_many(documents)
        else:
            client.submit(documents[0])
    assert info.value.code == "enqueue_failed"
    assert ("3 jobs" if many else "job lost-0") in str(info.value)
    for document in documents:
        record = store.get(document["id"])
        assert record is not None and record["status"] == "failed", record
        assert record["error"]["code"] == "enqueue_failed"


class Outage:
    """A stand-in for a MongoDB collection whose server goes away: while ``down``, every call
    raises what pymongo raises when it cannot reach the server."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._collection, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise ServerSelectionTimeoutError("127.0.0.1:27017: connection refused (stand-in)")
            return attr(*args, **kwargs)

        return call


class Switch:
    """Takes the store down and brings it back."""

    def __init__(self, outage: Outage | None = None, proxy: TcpProxy | None = None) -> None:
        self.outage, self.proxy = outage, proxy

    def down(self) -> None:
        if self.outage is not None:
            self.outage.down = True
        if self.proxy is not None:
            self.proxy.down()

    def up(self) -> None:
        if self.outage is not None:
            self.outage.down = False
        if self.proxy is not None:
            self.proxy.up()


def proxied_mongo_url(url: str, port: int) -> str:
    """``url`` (FUSION_TEST_MONGO_URL) pointed at a proxy on 127.0.0.1:``port``."""
    from urllib.parse import quote_plus

    from pymongo import uri_parser

    parsed = uri_parser.parse_uri(url)
    auth = ""
    if parsed.get("username"):
        auth = f"{quote_plus(parsed['username'])}:{quote_plus(parsed['password'] or '')}@"
    given = {str(k).lower(): v for k, v in parsed["options"].items()}
    options = "directConnection=true&serverSelectionTimeoutMS=1000"
    if given.get("authsource"):
        options += f"&authSource={given['authsource']}"
    if given.get("tls") or given.get("ssl"):
        options += "&tls=true&tlsAllowInvalidHostnames=true"
    return f"mongodb://{auth}127.0.0.1:{port}/?{options}"


@pytest.fixture(
    params=["stand-in"] + (["mongodb"] if os.environ.get("FUSION_TEST_MONGO_URL") else [])
)
def flaky_store(
    request: pytest.FixtureRequest, store: JobStore, tmp_path: Path
) -> Iterator[tuple[JobStore, Switch]]:
    """A job store that can be taken down: mongomock behind a stand-in, or (with
    FUSION_TEST_MONGO_URL) a real MongoDB behind a TCP proxy that is cut."""
    if request.param == "stand-in":
        outage = Outage(store.collection)
        yield JobStore(outage, retention=store.retention, blobs=None), Switch(outage=outage)
        return
    from pymongo import uri_parser

    url = os.environ["FUSION_TEST_MONGO_URL"]
    host, port = uri_parser.parse_uri(url)["nodelist"][0]
    proxy = TcpProxy(host, port)
    proxy.up()
    settings = Settings(
        mongo_url=proxied_mongo_url(url, proxy.port),
        mongo_db=f"fusion_faults_{os.getpid()}_{time.time_ns()}",
        data_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )
    real = connect_store(settings)
    yield real, Switch(proxy=proxy)
    if not proxy.is_up:
        proxy.up()
    real.collection.database.client.drop_database(real.collection.database.name)
    proxy.down()


def test_result_of_a_job_finishing_while_mongodb_is_down_is_kept_then_written(
    settings: Settings, redis: Redis, flaky_store: tuple[JobStore, Switch]
) -> None:
    flaky, switch = flaky_store
    settings = settings.model_copy(update={"recovery_grace_s": 0.0})
    client = Client(settings, redis, flaky)
    doc = {"kind": "completion", "model": TINY_MODEL, "input": {"prompt": "hi"}}
    slow = client.submit(
        {**doc, "metadata": {"sleep_s": "1"}, "webhook": {"url": "http://127.0.0.1:9/"}}
    )
    after = client.submit(doc)

    def cut_when_running() -> None:
        wait_for(lambda: flaky.get(slow)["status"] == "processing", 30, "the job to start")  # type: ignore[index]
        switch.down()

    cutter = threading.Thread(target=cut_when_running, daemon=True)
    cutter.start()
    build_worker(settings, redis, flaky, {ModelKind.LM: slow_kind}).work(burst=True)
    cutter.join()
    spool = Spool(settings.data_dir / "spool")
    assert [e.job_id for e in spool.entries()] == [slow]  # kept on disk
    assert redis.exists(settings.spooled_key(slow))

    switch.up()  # the store is back; the next worker writes what was kept, first
    assert flaky.get(slow)["status"] == "processing"
    build_worker(settings, redis, flaky, {ModelKind.LM: slow_kind}).work(burst=True)
    record = flaky.get(slow)
    assert record is not None and record["status"] == "completed", record
    assert record["result"]["slept_s"] == 1.0 and record["attempts"] == 1
    assert record["webhook"]["state"] == "pending" and record["webhook"]["event"] == "job.completed"
    assert list(spool.entries()) == [] and not redis.exists(settings.spooled_key(slow))
    assert flaky.get(after)["status"] == "completed"  # its start failed while down; recovered
