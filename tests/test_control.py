"""Operators and running workers: snapshots in Redis, load/unload commands, model crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import crash_kind
import pytest
import slow_kind
from conftest import TINY_MODEL, fusion_env, run_python, write_catalog
from redis import Redis

from mlx_fusion import control
from mlx_fusion.config import Settings
from mlx_fusion.jobs import parse_job
from mlx_fusion.registry import Catalog, ModelKind, ModelRegistry

PREFIX = "fusion"


def _until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_models_load_and_unload_reach_a_running_worker(
    tmp_path: Path, redis: Redis, redis_url: str, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "models.toml",
        {
            TINY_MODEL: {"kind": "lm", "path": tiny_model_dir},
            "always": {"kind": "lm", "path": tiny_model_dir, "pinned": True},
        },
    )
    env = fusion_env(tmp_path, redis_url, catalog, FUSION_WORKER_NAME="gpu-0")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_python(env, "-m", "mlx_fusion", *args, timeout_s=120)

    worker = subprocess.Popen(
        [sys.executable, "-m", "mlx_fusion", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _until(lambda: control.workers(redis, PREFIX) == ["gpu-0"], 60, "the worker's snapshot")
        _until(lambda: _loaded(redis) == ["always"], 60, "the pinned model to preload")
        loaded = cli("models", "load", TINY_MODEL, "--wait", "90")
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        assert "gpu-0: load tiny-llama: done" in loaded.stdout
        snap = control.read_snapshot(redis, PREFIX, "gpu-0")
        assert snap is not None and _loaded(redis) == ["always", TINY_MODEL]
        model_pid = next(m["pid"] for m in snap["models"] if m["id"] == TINY_MODEL)
        listing = cli("models")
        assert listing.returncode == 0 and "gpu-0 (ready" in listing.stdout
        unloaded = cli("models", "unload", TINY_MODEL, "--worker", "gpu-0")
        assert unloaded.returncode == 0 and "unload tiny-llama: done" in unloaded.stdout
        assert _loaded(redis) == ["always"]
        _until(lambda: not _pid_alive(model_pid), 10, "the model process to exit")
        unknown = cli("models", "load", "no-such-model", "--wait", "30")
        assert unknown.returncode == 1 and "model_not_found" in unknown.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert control.workers(redis, PREFIX) == []


def _loaded(redis: Redis) -> list[str]:
    snap = control.read_snapshot(redis, PREFIX, "gpu-0") or {"models": []}
    return sorted(m["id"] for m in snap["models"] if m["state"] == "ready")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def registry(tmp_path: Path, tiny_model_dir: Path) -> Any:
    catalog = Catalog.load(
        write_catalog(
            tmp_path / "models.toml",
            {n: {"kind": "lm", "path": tiny_model_dir} for n in ("a", "b")},
        )
    )
    reg = ModelRegistry(catalog, Settings(_env_file=None), kinds={ModelKind.LM: slow_kind})  # type: ignore[call-arg]
    yield reg
    reg.close()


def _slow_job(model: str, seconds: float) -> Any:
    return parse_job(
        {
            "id": "slow",
            "kind": "completion",
            "model": model,
            "input": {"prompt": "x"},
            "metadata": {"sleep_s": str(seconds)},
        },
        max_input_bytes=10_000,
    )


def test_unload_command_for_a_model_in_use_waits_for_its_lease(
    redis: Redis, registry: ModelRegistry
) -> None:
    loop = control.ControlLoop(redis, PREFIX, "w1", registry)
    holding = threading.Event()

    def job_on_a() -> None:
        with registry.lease(registry.catalog.resolve("a")) as lease:
            holding.set()
            lease.run(_slow_job("a", 1.5))

    runner = threading.Thread(target=job_on_a)
    runner.start()
    holding.wait(30)
    control.send_command(redis, PREFIX, "w1", "unload", "a")
    loop.tick()
    assert registry.loaded() == ["a"]  # the job still runs on it
    runner.join()
    assert registry.loaded() == []
    loop.tick()
    snap = control.read_snapshot(redis, PREFIX, "w1")
    assert snap is not None and snap["commands"][-1]["status"] == "done"


def test_load_command_is_applied_only_between_jobs(redis: Redis, registry: ModelRegistry) -> None:
    loop = control.ControlLoop(redis, PREFIX, "w1", registry)
    with registry.lease(registry.catalog.resolve("a")):
        control.send_command(redis, PREFIX, "w1", "load", "b")
        loop.tick()
        assert registry.loaded() == ["a"]
        assert control.read_snapshot(redis, PREFIX, "w1")["pending_loads"] == ["b"]  # type: ignore[index]
    loop.tick()
    assert sorted(registry.loaded()) == ["a", "b"]


def test_malformed_command_is_refused_and_the_loop_goes_on(
    redis: Redis, registry: ModelRegistry
) -> None:
    loop = control.ControlLoop(redis, PREFIX, "w1", registry)
    redis.rpush(control.commands_key(PREFIX, "w1"), b"{not json", json.dumps({"action": "rm"}))
    control.send_command(redis, PREFIX, "w1", "load", "a")
    loop.tick()
    results = control.read_snapshot(redis, PREFIX, "w1")["commands"]  # type: ignore[index]
    assert [r["status"] for r in results] == ["refused", "refused", "done"]
    assert registry.loaded() == ["a"]


def test_model_killed_mid_job_fails_it_and_the_worker_goes_on(
    client: Any, make_worker: Any
) -> None:
    doomed = client.submit(
        {
            "kind": "completion",
            "model": TINY_MODEL,
            "input": {"prompt": "x"},
            "metadata": {"sleep_s": "30"},
        }
    )
    after = client.submit({"kind": "completion", "model": TINY_MODEL, "input": {"prompt": "y"}})
    worker = make_worker(kinds={ModelKind.LM: slow_kind})
    registry = worker.runner.registry

    def kill_when_busy() -> None:
        def busy_pid() -> int | None:
            models = registry.snapshot()["models"]
            return models[0]["pid"] if models and models[0]["in_use"] else None

        pid = _until(busy_pid, 30, "the job to start")
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    started = time.monotonic()
    worker.work(burst=True)
    killer.join()
    assert time.monotonic() - started < 25
    doc = client.get(doomed)
    assert doc["status"] == "failed" and doc["error"]["code"] == "model_crashed"
    assert "SIGKILL" in doc["error"]["message"]
    assert client.get(after)["status"] == "completed"


def test_job_timeout_during_a_slow_load_kills_it_without_a_cooldown(
    client: Any, make_worker: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "slow.toml", {"slow-load": {"kind": "lm", "path": tiny_model_dir}}
    )
    job_id = client.submit(
        {"kind": "completion", "model": "slow-load", "input": {"prompt": "x"}, "timeout_s": 1}
    )
    worker = make_worker(kinds={ModelKind.LM: crash_kind}, catalog_path=catalog)
    started = time.monotonic()
    worker.work(burst=True)
    assert time.monotonic() - started < 15
    doc = client.get(job_id)
    assert doc["status"] == "failed" and doc["error"]["code"] == "timeout"
    snap = worker.runner.registry.snapshot()
    assert snap["cooldowns"] == {} and snap["models"] == []
