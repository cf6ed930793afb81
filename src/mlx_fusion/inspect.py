"""What ``mlx-fusion status`` and ``mlx-fusion stats`` show: the data as JSON-able dicts, built by
functions that only read Redis and the job store, and the human tables rendered from that data by
separate pure functions.

- ``status``: queues (depth, age of the oldest job, RQ registries), workers (RQ's worker hashes
  plus the model snapshot each GPU worker publishes) and the latest failed jobs. Each part fails
  alone: a store or Redis that cannot be read gives ``{"error": ...}`` for that part.
- ``job_stats``: jobs finished in a window, grouped by (kind, model): counts, throughput and
  nearest-rank percentiles of latency, queue wait and inference time.

Nothing here deserializes a producer's RQ payload, and no RQ registry cleanup runs (RQ's cleanup
would fetch producer-written jobs and run their failure callbacks): reading is side-effect free.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ResponseError
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import str_to_date
from rq.worker import Worker

from mlx_fusion import control
from mlx_fusion.config import Settings
from mlx_fusion.jobs.document import Status
from mlx_fusion.jobs.store import Document, JobStore, as_utc

MAX_STATS_RECORDS = 200_000
"""``job_stats`` reads at most this many records; more sets ``truncated``."""

STATS_PAGE_SIZE = 2_000
"""Records ``job_stats`` reads per query (only a page of whole records is held at once)."""

RECENT_FAILURES = 10
"""Failed jobs ``status`` lists."""

RECENT_EVICTIONS = 5
"""Latest model unloads and evictions ``status`` lists per worker."""

MISSING = "-"
"""Kind or model of a record that has none (a job rejected before it could be parsed)."""

TOTAL = "*"
"""Kind and model of the totals row of ``job_stats``."""

PERCENTILES = (50, 95, 99)
"""The percentiles ``job_stats`` reports, as ``p50``, ``p95``, ``p99``."""

T = TypeVar("T")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _iso(value: dt.datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def _age_s(now: dt.datetime, then: dt.datetime | None) -> float | None:
    if then is None:
        return None
    delta: dt.timedelta = as_utc(now) - as_utc(then)
    return round(delta.total_seconds(), 3)


# --- queues -------------------------------------------------------------------------------------


def _enqueued_at(redis: Redis, job_id: bytes) -> dt.datetime | None:
    """``enqueued_at`` of an RQ job read from its hash alone (the payload is never decoded); None
    for an entry with no hash, a key of another type or a field that is not an RQ timestamp."""
    key = Job.redis_job_namespace_prefix.encode() + job_id
    try:
        raw = redis.hget(key, "enqueued_at")
        return str_to_date(raw) if isinstance(raw, bytes) and raw else None
    except ResponseError:  # WRONGTYPE: a producer wrote rq:job:<id> as something else
        return None
    except ValueError:  # not an RQ timestamp (UnicodeDecodeError included)
        return None


def _scheduled(redis: Redis, name: str) -> int:
    registry = ScheduledJobRegistry(name, connection=redis)  # type: ignore[no-untyped-call]
    return registry.get_job_count(cleanup=False)


def _one_queue(redis: Redis, name: str, now: dt.datetime) -> dict[str, Any]:
    key = Queue.redis_queue_namespace_prefix + name
    head = redis.lindex(key, 0)
    enqueued = _enqueued_at(redis, head) if isinstance(head, bytes) else None
    return {
        "name": name,
        "depth": int(redis.llen(key)),
        "oldest_age_s": _age_s(now, enqueued),
        "started": StartedJobRegistry(name, connection=redis).get_job_count(cleanup=False),
        "scheduled": _scheduled(redis, name),
        "failed": FailedJobRegistry(name, connection=redis).get_job_count(cleanup=False),
    }


def queue_status(redis: Redis, settings: Settings, now: dt.datetime) -> list[dict[str, Any]]:
    """Each job queue (highest priority first), then the webhook queue: ``{"name", "depth",
    "oldest_age_s", "started", "scheduled", "failed"}``.

    ``oldest_age_s`` is ``now`` minus the ``enqueued_at`` of the job at the head of the queue,
    None when the queue is empty or that entry cannot be read. ``started`` counts executions in
    RQ's started registry (including any whose heartbeat expired, not yet cleaned up).
    """
    names = [*settings.queue_names(), settings.webhook_queue_name()]
    return [_one_queue(redis, name, now) for name in names]


# --- workers ------------------------------------------------------------------------------------


def _snapshot(redis: Redis, settings: Settings, name: str) -> dict[str, Any] | None:
    try:
        snap = control.read_snapshot(redis, settings.queue_prefix, name)
    except ValueError:  # not JSON: show the worker without models rather than no workers
        return None
    return snap if isinstance(snap, dict) else None


def _models(snapshot: Mapping[str, Any]) -> list[dict[str, Any]]:
    models = snapshot.get("models")
    if not isinstance(models, list):
        return []
    return [
        {k: m.get(k) for k in ("id", "state", "bytes", "in_use")}
        for m in models
        if isinstance(m, dict)
    ]


def worker_status(redis: Redis, settings: Settings, now: dt.datetime) -> list[dict[str, Any]]:
    """Every RQ worker listening on one of this deployment's queues, by name: ``{"name", "kind",
    "state", "current_job", "queues", "last_heartbeat", "heartbeat_age_s", "birth", "pid",
    "hostname", "models", "used_bytes", "budget_bytes", "cooldowns", "recent_evictions"}``.

    ``kind`` is ``"webhook"`` for a worker that listens only on the webhook queue, else ``"gpu"``.
    ``models`` (``[{"id", "state", "bytes", "in_use"}]``), ``used_bytes``, ``budget_bytes``,
    ``cooldowns`` (models whose loads failed: ``{id: {failures, retry_in_s, reason}}``) and
    ``recent_evictions`` (the last few unloads with their reason) come from the registry
    snapshot the worker publishes; None for webhook workers and workers with no snapshot.
    """
    webhook_queue = settings.webhook_queue_name()
    ours = {*settings.queue_names(), webhook_queue}
    found = []
    for worker in Worker.all(connection=redis, serializer=JSONSerializer):
        queues = worker.queue_names()
        if not ours.intersection(queues):
            continue
        kind = "webhook" if set(queues) == {webhook_queue} else "gpu"
        snap = _snapshot(redis, settings, worker.name) if kind == "gpu" else None
        found.append(
            {
                "name": worker.name,
                "kind": kind,
                "state": worker.get_state(),
                "current_job": worker.get_current_job_id(),
                "queues": queues,
                "last_heartbeat": _iso(worker.last_heartbeat),
                "heartbeat_age_s": _age_s(now, worker.last_heartbeat),
                "birth": _iso(worker.birth_date),
                "pid": worker.pid,
                "hostname": worker.hostname,
                "models": _models(snap) if snap is not None else None,
                "used_bytes": snap.get("used_bytes") if snap is not None else None,
                "budget_bytes": snap.get("budget_bytes") if snap is not None else None,
                "cooldowns": _dict(snap.get("cooldowns")) if snap is not None else None,
                "recent_evictions": _list(snap.get("evictions"))[-RECENT_EVICTIONS:]
                if snap is not None
                else None,
            }
        )
    return sorted(found, key=lambda w: str(w["name"]))


# --- failures and the whole status ---------------------------------------------------------------


def recent_failures(store: JobStore, limit: int = RECENT_FAILURES) -> list[dict[str, Any]]:
    """The latest failed jobs, newest first: ``{"id", "model", "kind", "finished_at", "code",
    "message"}`` (None where the record has no such field)."""
    docs = store.find(
        {"status": Status.FAILED.value}, sort="finished_at", limit=limit, descending=True
    )
    out = []
    for doc in docs:
        error = _dict(doc.get("error"))
        finished = doc.get("finished_at")
        out.append(
            {
                "id": doc["id"],
                "model": doc.get("model"),
                "kind": doc.get("kind"),
                "finished_at": _iso(finished) if isinstance(finished, dt.datetime) else None,
                "code": error.get("code"),
                "message": error.get("message"),
            }
        )
    return out


def _part(read: Callable[[], T]) -> T | dict[str, str]:
    try:
        return read()
    except Exception as e:  # FusionError from the store, RedisError, anything: report, go on
        return {"error": f"{type(e).__name__}: {e}"}


def status(redis: Redis, settings: Settings, store: JobStore, now: dt.datetime) -> dict[str, Any]:
    """``{"at", "queues", "workers", "recent_failures"}``: ``queue_status``, ``worker_status``
    and ``recent_failures``; a part that cannot be read is ``{"error": "<Type>: <message>"}``."""
    return {
        "at": _iso(now),
        "queues": _part(lambda: queue_status(redis, settings, now)),
        "workers": _part(lambda: worker_status(redis, settings, now)),
        "recent_failures": _part(lambda: recent_failures(store)),
    }


# --- stats --------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0 to 100) of ascending values by the nearest-rank method: the
    smallest value with at least ``q`` percent of the values at or below it; None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    values.sort()
    return {f"p{q}": percentile(values, q) for q in PERCENTILES}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class _Group:
    count: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    inference_s: list[float] = field(default_factory=list)
    tokens: float = 0.0
    token_seconds: float = 0.0

    def add(self, doc: Mapping[str, Any]) -> None:
        self.count += 1
        state = str(doc.get("status"))
        self.statuses[state] = self.statuses.get(state, 0) + 1
        if state != Status.COMPLETED.value:
            return
        created, finished = doc.get("created_at"), doc.get("finished_at")
        if isinstance(created, dt.datetime) and isinstance(finished, dt.datetime):
            self.latency_s.append((as_utc(finished) - as_utc(created)).total_seconds())
        metrics = _dict(doc.get("metrics"))
        if (wait_ms := _number(metrics.get("queue_wait_ms"))) is not None:
            self.queue_wait_s.append(wait_ms / 1000)
        inference_ms = _number(metrics.get("inference_ms"))
        if inference_ms is not None:
            self.inference_s.append(inference_ms / 1000)
        tokens = _number(metrics.get("completion_tokens"))
        if tokens is not None and inference_ms is not None and inference_ms > 0:
            self.tokens += tokens
            self.token_seconds += inference_ms / 1000

    def row(self, kind: str, model: str, window_s: float) -> dict[str, Any]:
        completed = self.statuses.get(Status.COMPLETED.value, 0)
        return {
            "kind": kind,
            "model": model,
            "count": self.count,
            "completed": completed,
            "failed": self.statuses.get(Status.FAILED.value, 0),
            "cancelled": self.statuses.get(Status.CANCELLED.value, 0),
            "throughput_per_s": completed / window_s,
            "latency_s": _percentiles(self.latency_s),
            "queue_wait_s": _percentiles(self.queue_wait_s),
            "inference_s": _percentiles(self.inference_s),
            "tokens_per_s": self.tokens / self.token_seconds if self.tokens > 0 else None,
        }


def _finished_between(
    store: JobStore, since: dt.datetime, until: dt.datetime, limit: int, page_size: int
) -> Iterator[Document]:
    """Records finished in [since, until), oldest first, at most ``limit``, read a page at a time.

    Each page starts at the last page's final ``finished_at`` and excludes the ids already read
    at that instant, so records sharing a timestamp across a page boundary are read once."""
    upper = store.query_time(until)
    lower, seen_at_lower = store.query_time(since), list[str]()
    read = 0
    while read < limit:
        query: dict[str, Any] = {"finished_at": {"$gte": lower, "$lt": upper}}
        if seen_at_lower:
            query["_id"] = {"$nin": seen_at_lower}
        want = min(page_size, limit - read)
        page = store.find(query, sort="finished_at", limit=want)
        yield from page
        read += len(page)
        if len(page) < want:
            return
        last = page[-1]["finished_at"]
        at_last = [d["id"] for d in page if d["finished_at"] == last]
        same_instant = store.query_time(last) == lower
        seen_at_lower = seen_at_lower + at_last if same_instant else at_last
        lower = store.query_time(last)


def job_stats(
    store: JobStore,
    since: dt.datetime,
    until: dt.datetime,
    *,
    max_records: int = MAX_STATS_RECORDS,
    page_size: int = STATS_PAGE_SIZE,
) -> dict[str, Any]:
    """Jobs finished in [since, until), grouped by (kind, model): ``{"since", "until",
    "window_s", "groups", "total", "truncated"}``.

    Each group and ``total`` (kind and model ``"*"``) is ``{"kind", "model", "count",
    "completed", "failed", "cancelled", "throughput_per_s", "latency_s", "queue_wait_s",
    "inference_s", "tokens_per_s"}``. The three timings are ``{"p50", "p95", "p99"}`` in seconds
    (nearest rank, None when there are no values) over completed jobs: latency is ``finished_at
    - created_at``, the others come from the job's metrics. ``throughput_per_s`` is completed
    jobs per second of the window; ``tokens_per_s`` is the completion tokens of completed jobs
    over their inference time (None when they report none). Records with no kind or model group
    under ``"-"``. At most ``max_records`` records are read; ``truncated`` says more finished in
    the window.
    """
    window_s = (as_utc(until) - as_utc(since)).total_seconds()
    if window_s <= 0:
        raise ValueError("until must be later than since")
    groups: dict[tuple[str, str], _Group] = {}
    total = _Group()
    truncated = False
    for read, doc in enumerate(_finished_between(store, since, until, max_records + 1, page_size)):
        if read == max_records:
            truncated = True
            break
        model = doc.get("model_id") or doc.get("model")  # the catalog id, not an alias
        key = (str(doc.get("kind") or MISSING), str(model or MISSING))
        groups.setdefault(key, _Group()).add(doc)
        total.add(doc)
    return {
        "since": _iso(since),
        "until": _iso(until),
        "window_s": window_s,
        "groups": [groups[key].row(*key, window_s) for key in sorted(groups)],
        "total": total.row(TOTAL, TOTAL, window_s),
        "truncated": truncated,
    }


# --- rendering ----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A table cell: '-' for None, control characters (from producer-written ids and messages)
    replaced so they cannot drive the terminal."""
    if value is None:
        return MISSING
    return "".join(c if c.isprintable() else "?" for c in str(value))


def _clip(value: Any, width: int) -> str:
    text = _text(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _seconds(value: Any) -> str:
    return MISSING if value is None else f"{value:.2f}s"


def _bytes(value: Any) -> str:
    if value is None:
        return MISSING
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]


def _section(title: str, part: Any, render: Callable[[Any], list[str]]) -> list[str]:
    if isinstance(part, dict) and "error" in part:
        return [f"{title}: unavailable ({_clip(part['error'], 300)})"]
    if not part:
        return [f"{title}: none"]
    return [f"{title}:", *("  " + line for line in render(part))]


def _queue_rows(queues: list[dict[str, Any]]) -> list[str]:
    headers = ("queue", "depth", "oldest", "started", "scheduled", "failed")
    rows = [
        [_text(q["name"]), str(q["depth"]), _seconds(q["oldest_age_s"])]
        + [str(q[k]) for k in ("started", "scheduled", "failed")]
        for q in queues
    ]
    return _table(headers, rows)


def _models_cell(worker: Mapping[str, Any]) -> str:
    if worker["models"] is None:
        return MISSING
    loaded = [
        f"{_text(m['id'])} ({_text(m['state'])}, {_bytes(m['bytes'])}"
        + (", in use)" if m.get("in_use") else ")")
        for m in worker["models"]
    ]
    memory = f"{_bytes(worker['used_bytes'])} of {_bytes(worker['budget_bytes'])}"
    return f"{memory}: {', '.join(loaded)}" if loaded else f"{memory}: no model loaded"


def _worker_rows(workers: list[dict[str, Any]]) -> list[str]:
    headers = ("worker", "kind", "state", "job", "heartbeat", "pid", "models")
    rows = [
        [
            _text(w["name"]),
            w["kind"],
            _text(w["state"]),
            _clip(w["current_job"], 40),
            _seconds(w["heartbeat_age_s"]) + " ago" if w["heartbeat_age_s"] is not None else "-",
            _text(w["pid"]),
            _models_cell(w),
        ]
        for w in workers
    ]
    return _table(headers, rows)


def _failure_rows(failures: list[dict[str, Any]]) -> list[str]:
    headers = ("finished", "job", "kind", "model", "error")
    rows = [
        [
            _text(f["finished_at"]),
            _clip(f["id"], 40),
            _clip(f["kind"], 24),
            _clip(f["model"], 40),
            _clip(f"{_text(f['code'])}: {_text(f['message'])}", 80),
        ]
        for f in failures
    ]
    return _table(headers, rows)


def render_status(status: Mapping[str, Any]) -> str:
    """``status()``'s data as the text ``mlx-fusion status`` prints."""
    lines = [
        f"mlx-fusion status at {_text(status['at'])}",
        "",
        *_section("Queues", status["queues"], _queue_rows),
        "",
        *_section("Workers", status["workers"], _worker_rows),
        "",
        *_section("Recent failures", status["recent_failures"], _failure_rows),
    ]
    return "\n".join(lines) + "\n"


def _spread(timings: Mapping[str, Any]) -> str:
    values = [timings[f"p{q}"] for q in PERCENTILES]
    if all(v is None for v in values):
        return MISSING
    return "/".join(MISSING if v is None else f"{v:.2f}" for v in values)


def _stats_row(row: Mapping[str, Any]) -> list[str]:
    tokens = row["tokens_per_s"]
    return [
        _clip(row["kind"], 24),
        _clip(row["model"], 40),
        *(str(row[k]) for k in ("count", "completed", "failed", "cancelled")),
        f"{row['throughput_per_s']:.3g}",
        _spread(row["latency_s"]),
        _spread(row["queue_wait_s"]),
        _spread(row["inference_s"]),
        MISSING if tokens is None else f"{tokens:.1f}",
    ]


def render_stats(stats: Mapping[str, Any]) -> str:
    """``job_stats()``'s data as the text ``mlx-fusion stats`` prints (timings in seconds,
    p50/p95/p99)."""
    head = (
        f"Jobs finished from {_text(stats['since'])} to {_text(stats['until'])} "
        f"({stats['window_s']:g} s)"
    )
    if stats["truncated"]:
        head += f"; only the first {stats['total']['count']} read"
    if not stats["groups"]:
        return f"{head}\nno jobs finished\n"
    headers = (
        "kind",
        "model",
        "jobs",
        "done",
        "failed",
        "cancelled",
        "done/s",
        "latency",
        "queue wait",
        "inference",
        "tokens/s",
    )
    rows = [_stats_row(g) for g in stats["groups"]] + [_stats_row(stats["total"])]
    return "\n".join([head, "", *_table(headers, rows)]) + "\n"
