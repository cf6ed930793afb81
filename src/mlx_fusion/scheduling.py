"""Model-aware scheduling: before each dequeue the worker looks at the head of its
highest-priority non-empty queue and moves the job it should run next to the front.

- A job whose model is loaded goes before jobs whose models would have to be loaded (so every
  waiting job of a loaded model runs before the worker switches).
- When no waiting job's model is loaded, the model that clears the most waiting jobs per second
  of load time goes first.
- Fairness: once the job at the head has waited ``schedule_max_wait_s``, it runs next whatever
  its model; priorities hold (only the highest-priority non-empty queue is reordered).
- When a load must evict, the registry evicts models no waiting job names before those some
  waiting job names (``waiting_models``), least recently used first within each.

The reorder is one atomic Redis script (LREM, then LPUSH); a job another worker takes meanwhile
is simply not moved. Producers need not do anything; ``Client`` also writes the model into the
RQ job's ``meta`` so the worker reads a few bytes instead of the document.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from rq.utils import utcparse

log = structlog.get_logger(__name__)

_MOVE_TO_HEAD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
_CLAIM = """
local claimed = {}
for i = 2, #ARGV do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
    redis.call('HSET', 'rq:job:' .. ARGV[i], 'status', 'started', 'worker_name', ARGV[1])
    table.insert(claimed, ARGV[i])
  end
end
return claimed
"""
_MODEL_CACHE_SIZE = 4096
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
"""Most of a decompressed RQ payload read to find the job's model."""
DEFAULT_LOAD_S = 1.0
"""Load time assumed for a model never loaded here."""


@dataclass(frozen=True)
class Waiting:
    """A job at the head of a queue, as the scheduler sees it."""

    job_id: str
    model: str | None
    """Catalog id of its model; None when it cannot be told (the job then keeps its place)."""
    waited_s: float | None


def choose(
    waiting: Sequence[Waiting],
    loaded: set[str],
    *,
    max_wait_s: float,
    load_s: Callable[[str], float],
) -> int:
    """Index (in ``waiting``, oldest first) of the job to run next (pure)."""
    if not waiting:
        return 0
    head = waiting[0]
    if head.model is None or head.model in loaded:
        return 0
    if head.waited_s is not None and head.waited_s >= max_wait_s:
        return 0
    for i, job in enumerate(waiting):
        if job.model in loaded:
            return i
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, job in enumerate(waiting):
        if job.model is not None:
            counts[job.model] = counts.get(job.model, 0) + 1
            first.setdefault(job.model, i)
    best = max(counts, key=lambda m: (counts[m] / max(load_s(m), 1e-3), -first[m]))
    return first[best]


def model_of_payload(data: bytes) -> str | None:
    """The ``model`` of the job document in an RQ payload (JSON, maybe zlib-compressed)."""
    try:
        with contextlib.suppress(zlib.error):  # bounded: a raw payload may be a zip bomb
            data = zlib.decompressobj().decompress(data, MAX_PAYLOAD_BYTES)
        payload = json.loads(data)
        document = payload[2][0]
        model = document.get("model") if isinstance(document, dict) else None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None
    return model if isinstance(model, str) else None


class Scheduler:
    """Reorders the head of a worker's queues (see the module docstring)."""

    def __init__(
        self,
        connection: Any,
        *,
        lookahead: int,
        max_wait_s: float,
        resolve: Callable[[str], str | None],
        loaded: Callable[[], set[str]],
        load_s: Callable[[str], float],
    ) -> None:
        self._redis = connection
        self._lookahead = lookahead
        self._max_wait_s = max_wait_s
        self._resolve = resolve
        self._loaded = loaded
        self._load_s = load_s
        self._move = connection.register_script(_MOVE_TO_HEAD)
        self._claim = connection.register_script(_CLAIM)
        self._models: OrderedDict[str, str | None] = OrderedDict()
        self.waiting_models: frozenset[str] = frozenset()
        """Models of the jobs at the head of every queue at the last ``prepare`` (the registry
        evicts others first)."""

    def prepare(self, queue_keys: Sequence[str], now_ts: float) -> str | None:
        """Move the job to run next to the head of the first non-empty queue of
        ``queue_keys`` (highest priority first); returns its id when one was moved."""
        if self._lookahead <= 1:
            return None
        with self._redis.pipeline(transaction=False) as pipe:
            for key in queue_keys:
                pipe.lrange(key, 0, self._lookahead - 1)
            # a producer may push anything: an id that is not text matches no job and stays put
            heads = [[i.decode(errors="replace") for i in ids] for ids in pipe.execute()]
        views = {
            key: self._describe(ids, now_ts)
            for key, ids in zip(queue_keys, heads, strict=True)
            if ids
        }
        self.waiting_models = frozenset(
            job.model for view in views.values() for job in view if job.model is not None
        )
        if not views:
            return None
        key, waiting = next(iter(views.items()))
        pick = choose(waiting, self._loaded(), max_wait_s=self._max_wait_s, load_s=self._load_s)
        if pick == 0:
            return None
        job_id = waiting[pick].job_id
        if self._move(keys=[key], args=[job_id]):
            log.debug("job_moved_ahead", job_id=job_id, model=waiting[pick].model, skipped=pick)
            return job_id
        return None

    def _describe(self, ids: list[str], now_ts: float) -> list[Waiting]:
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(f"rq:job:{job_id}", "enqueued_at", "meta")
            rows = pipe.execute()
        waiting = []
        for job_id, (enqueued_at, meta) in zip(ids, rows, strict=True):
            waited = None
            if enqueued_at:
                try:
                    waited = now_ts - utcparse(enqueued_at.decode()).timestamp()
                except (ValueError, UnicodeDecodeError):
                    waited = None
            waiting.append(Waiting(job_id, self._model(job_id, meta), waited))
        return waiting

    def _model(self, job_id: str, meta: bytes | None) -> str | None:
        if job_id in self._models:
            self._models.move_to_end(job_id)
            return self._models[job_id]
        name = None
        if meta:
            try:
                found = json.loads(meta).get("model")
                name = found if isinstance(found, str) else None
            except (ValueError, AttributeError):
                name = None
        if name is None:
            data = self._redis.hget(f"rq:job:{job_id}", "data")
            name = model_of_payload(data) if data else None
        model = self._resolve(name) if name else None
        self._models[job_id] = model
        if len(self._models) > _MODEL_CACHE_SIZE:
            self._models.popitem(last=False)
        return model

    def batchable(
        self, queue_keys: Sequence[str], model: str, now_ts: float, limit: int
    ) -> tuple[str, list[str]] | None:
        """(queue key, ids) of up to ``limit`` waiting jobs of ``model`` that may join its
        running batch now: from the highest-priority non-empty queue only (priorities hold), and
        none once a job of another model at its head has waited ``max_wait_s``. Without
        lookahead (FIFO) only the jobs of ``model`` at the very head qualify."""
        if limit <= 0:
            return None
        window = max(self._lookahead, limit) if self._lookahead > 1 else limit
        with self._redis.pipeline(transaction=False) as pipe:
            for key in queue_keys:
                pipe.lrange(key, 0, window - 1)
            heads = pipe.execute()
        for key, raw in zip(queue_keys, heads, strict=True):
            if not raw:
                continue
            waiting = self._describe([i.decode(errors="replace") for i in raw], now_ts)
            head = waiting[0]
            if head.model != model and (head.waited_s or 0.0) >= self._max_wait_s:
                return None
            if self._lookahead <= 1:
                picks = []
                for job in waiting:
                    if job.model != model:
                        break
                    picks.append(job.job_id)
            else:
                picks = [job.job_id for job in waiting if job.model == model]
            return (key, picks[:limit]) if picks else None
        return None

    def claim(self, queue_key: str, job_ids: Sequence[str], worker_name: str) -> list[str]:
        """Take ``job_ids`` out of the queue for ``worker_name``, atomically (one script: each
        removed entry's RQ job is marked started, so recovery requeues it should the worker
        die before it runs); the ids it took (another worker may have been first)."""
        if not job_ids:
            return []
        taken = self._claim(keys=[queue_key], args=[worker_name, *job_ids])
        return [t.decode() if isinstance(t, bytes) else str(t) for t in taken]
