"""Operators and a running worker, through Redis: the worker publishes its registry snapshot,
and takes ``load`` / ``unload`` commands for its models.

Keys (``<prefix>`` is the queue prefix, ``fusion`` by default):

- ``<prefix>:worker:<name>:models``: the worker's ``registry.snapshot()`` as JSON, refreshed
  every ``interval_s`` and expiring when the worker stops refreshing it.
- ``<prefix>:worker:<name>:catalog``: the models the worker serves (``registry.describe``), as
  a JSON list, with the same lifetime.
- ``<prefix>:worker:<name>:commands``: a list of JSON commands ``{"action", "model", "id"}``.

A worker applies ``unload`` at once (the registry defers it to the end of the model's lease) and
``load`` only between jobs, when no lease is held.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import deque
from typing import Any, Literal

import structlog
from redis import Redis
from redis.exceptions import RedisError

from mlx_fusion.errors import FusionError
from mlx_fusion.registry import ModelRegistry

log = structlog.get_logger(__name__)

Action = Literal["load", "unload"]
CONTROL_INTERVAL_S = 1.0
SNAPSHOT_TTL_INTERVALS = 10
MAX_COMMAND_RESULTS = 20


def snapshot_key(prefix: str, worker: str) -> str:
    """Where a worker publishes its registry snapshot."""
    return f"{prefix}:worker:{worker}:models"


def catalog_key(prefix: str, worker: str) -> str:
    """Where a worker publishes the description of its catalog."""
    return f"{prefix}:worker:{worker}:catalog"


def read_catalog(redis: Redis, prefix: str, worker: str) -> list[dict[str, Any]]:
    """A worker's published catalog description (empty when it has none)."""
    raw = redis.get(catalog_key(prefix, worker))
    return list(json.loads(raw)) if raw else []


def commands_key(prefix: str, worker: str) -> str:
    """Where a worker takes its commands from."""
    return f"{prefix}:worker:{worker}:commands"


def send_command(redis: Redis, prefix: str, worker: str, action: Action, model: str) -> str:
    """Queue a command for one worker; returns the command id."""
    command_id = uuid.uuid4().hex[:12]
    body = json.dumps({"action": action, "model": model, "id": command_id})
    redis.rpush(commands_key(prefix, worker), body)
    return command_id


def workers(redis: Redis, prefix: str) -> list[str]:
    """Names of the workers whose snapshot is current."""
    head, tail = f"{prefix}:worker:", ":models"
    names = [
        key.decode()[len(head) : -len(tail)]
        for key in redis.scan_iter(match=f"{head}*{tail}", count=200)
    ]
    return sorted(names)


def read_snapshot(redis: Redis, prefix: str, worker: str) -> dict[str, Any] | None:
    """A worker's last published snapshot, or None."""
    raw = redis.get(snapshot_key(prefix, worker))
    return json.loads(raw) if raw else None


class ControlLoop:
    """A thread in the worker: publishes the snapshot and applies commands."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        worker: str,
        registry: ModelRegistry,
        *,
        interval_s: float = CONTROL_INTERVAL_S,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._worker = worker
        self._registry = registry
        self._interval_s = interval_s
        self._pending_loads: deque[dict[str, Any]] = deque()
        self._results: deque[dict[str, Any]] = deque(maxlen=MAX_COMMAND_RESULTS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fusion-control", daemon=True)
        self._catalog: str | None = None

    def start(self) -> None:
        """Describe the catalog (once: it reads each model's folder) and start the thread."""
        from mlx_fusion.registry.describe import describe_catalog

        self._catalog = json.dumps(describe_catalog(self._registry.catalog), default=str)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and remove the snapshot (the worker is gone)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(RedisError):
            self._redis.delete(
                snapshot_key(self._prefix, self._worker), catalog_key(self._prefix, self._worker)
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except RedisError as e:
                log.warning("control_redis_error", error=str(e))
            except Exception as e:  # the loop must outlive any one bad command
                log.error("control_failed", error=f"{type(e).__name__}: {e}")
            self._stop.wait(self._interval_s)

    def tick(self) -> None:
        """Take new commands, apply what may be applied now, publish the snapshot."""
        key = commands_key(self._prefix, self._worker)
        while (raw := self._redis.lpop(key)) is not None:
            self._take(raw if isinstance(raw, bytes) else str(raw).encode())
        while self._pending_loads and self._registry.active_leases() == 0:
            self._apply(self._pending_loads.popleft())
        self.publish()

    def publish(self) -> None:
        """Write the snapshot (with recent command results) to Redis."""
        snapshot = self._registry.snapshot()
        snapshot["worker"] = self._worker
        snapshot["published_at"] = time.time()
        snapshot["commands"] = list(self._results)
        snapshot["pending_loads"] = [c["model"] for c in self._pending_loads]
        ttl = max(2, int(self._interval_s * SNAPSHOT_TTL_INTERVALS))
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(snapshot_key(self._prefix, self._worker), json.dumps(snapshot), ex=ttl)
            if self._catalog is not None:
                pipe.set(catalog_key(self._prefix, self._worker), self._catalog, ex=ttl)
            pipe.execute()

    def _take(self, raw: bytes) -> None:
        try:
            command = json.loads(raw)
            action, model = command["action"], command["model"]
            if action not in ("load", "unload") or not isinstance(model, str):
                raise ValueError("action must be load or unload, model a string")
        except (ValueError, KeyError, TypeError) as e:
            self._record({"raw": raw[:200].decode(errors="replace")}, "refused", str(e))
            return
        if action == "load":
            self._pending_loads.append(command)
        else:
            self._apply(command)

    def _apply(self, command: dict[str, Any]) -> None:
        action, model = command["action"], command["model"]
        try:
            if action == "load":
                self._registry.load(model)
                self._record(command, "done")
            elif self._registry.unload(model):
                self._record(command, "done")
            else:
                self._record(command, "not_loaded")
        except FusionError as e:
            self._record(command, "failed", f"[{e.code}] {e.message}")

    def _record(self, command: dict[str, Any], status: str, error: str | None = None) -> None:
        result = {**command, "status": status, "at": time.time()}
        if error:
            result["error"] = error
        self._results.append(result)
        log.info("control_command", **result)
