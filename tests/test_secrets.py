"""Secrets never leave the settings: a Redis password, the default and named webhook secrets and
their key bytes appear in no log line (ours or RQ's), no printed output, no job record and not in
the settings' repr, through a job that completes with a signed webhook and one that fails. URLs
with credentials and TLS are taken as they are."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slow_kind
import structlog
from conftest import TINY_MODEL, RedisServer, build_worker, worker_settings
from pydantic import SecretStr
from webhook_helpers import http_receiver

from mlx_fusion.client import Client
from mlx_fusion.jobs.store import JobStore
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.services import redis_connection
from mlx_fusion.webhooks.delivery import Deliverer
from mlx_fusion.webhooks.outbox import Outbox
from mlx_fusion.webhooks.signing import generate_secret
from mlx_fusion.webhooks.worker import WebhookWorker

PASSWORD = "Redis-Pass-7f3c9a"  # a throwaway server's


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", "--save", "", password=PASSWORD)
    server.start()
    yield server
    server.stop()


def test_no_secret_reaches_logs_output_or_records(
    tmp_path: Path,
    catalog_path: Path,
    store: JobStore,
    locked_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    default_secret, named_secret = generate_secret(), generate_secret()
    settings = worker_settings(locked_redis.url, tmp_path / "data", catalog_path).model_copy(
        update={
            "webhook_secrets": [SecretStr(default_secret)],
            "webhook_named_secrets": {"tier2": [SecretStr(named_secret)]},
            "webhook_allow": ["127.0.0.0/8"],
            "webhook_schedule_s": [0.0],
        }
    )
    redis = redis_connection(settings)
    client = Client(settings, redis, store)
    caplog.set_level("DEBUG")
    with structlog.testing.capture_logs() as events, http_receiver() as receiver:
        webhook = {"url": receiver.url, "secret": "tier2"}
        doc: dict[str, Any] = {"kind": "completion", "input": {"prompt": "hi"}, "webhook": webhook}
        ok = client.submit({**doc, "model": TINY_MODEL})
        failed = client.submit({**doc, "model": "no-such-model"})
        build_worker(settings, redis, store, {ModelKind.LM: slow_kind}).work(burst=True)
        deliverer = Deliverer(settings, Outbox(settings, store, redis))
        WebhookWorker(settings=settings, connection=redis, deliverer=deliverer).work(burst=True)
    assert len(receiver.received) == 2  # both were signed and sent
    records = [client.get(ok), client.get(failed)]
    assert records[0]["status"] == "completed" and records[1]["status"] == "failed"

    printed = capsys.readouterr()
    haystacks = {
        "structlog events": json.dumps(events, default=str),
        "stdlib logs": caplog.text,
        "stdout": printed.out,
        "stderr": printed.err,
        "job records": json.dumps(records, default=str),
        "settings repr": repr(settings),
    }
    secrets = [PASSWORD, default_secret, named_secret]
    secrets += [
        base64.b64encode(base64.b64decode(s.removeprefix("whsec_"))).decode() for s in secrets[1:]
    ]
    leaks = [(name, where) for name in secrets for where, text in haystacks.items() if name in text]
    assert events, "the job logged nothing: the test would prove nothing"
    assert leaks == []


def test_redis_tls_url_with_credentials_gives_a_tls_connection(tmp_path: Path) -> None:
    from mlx_fusion.config import Settings

    settings = Settings(
        redis_url=f"rediss://worker:{PASSWORD}@127.0.0.1:6380/2",
        data_dir=tmp_path,
        _env_file=None,  # type: ignore[call-arg]
    )
    pool = redis_connection(settings).connection_pool  # nothing connects until a command
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["password"] == PASSWORD
    assert pool.connection_kwargs["username"] == "worker" and pool.connection_kwargs["db"] == 2
    assert PASSWORD not in repr(settings)
