"""Prometheus metrics and the worker's HTTP endpoint (``/metrics``, ``/healthz``).

Every process that serves metrics owns one ``CollectorRegistry`` (never the global one), and
every series it exports carries a ``worker`` label with the worker's name, so one dashboard can
tell the workers of a fleet apart. Counts of things that happen (jobs, loads, deliveries) are
kept by hooks the runner, the registry and the deliverer call; sizes of things that exist
(loaded models, queue depths) are read when Prometheus scrapes.

Names follow Prometheus conventions: ``_total`` counters, ``_seconds`` and ``_bytes`` units.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlx_fusion import __version__
from mlx_fusion.errors import FusionError

log = structlog.get_logger(__name__)

PREFIX = "fusion"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Histogram buckets for job phases: milliseconds (a cached embedding) to minutes (an image)."""
LOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
"""Histogram buckets for model loads."""
WEBHOOK_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Histogram buckets for webhook attempts (bounded by the webhook timeout)."""

_FINAL_STATE_RESULT = {"delivered": "delivered", "failed": "failed"}
_ATTEMPT_OUTCOME = {"delivered": "delivered", "pending": "retry", "failed": "failed"}


class WithWorkerLabel(Collector):
    """Collects an inner registry and adds ``worker=<name>`` to every sample."""

    def __init__(self, inner: CollectorRegistry, worker: str) -> None:
        self._inner = inner
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                labelled.add_sample(
                    s.name, {**s.labels, "worker": self._worker}, s.value, s.timestamp, s.exemplar
                )
            yield labelled


class Gauges(Collector):
    """Gauge families built by ``read`` at every scrape; a failing read is logged and yields
    nothing (the other families still export)."""

    def __init__(self, read: Callable[[], Iterable[GaugeMetricFamily]], what: str) -> None:
        self._read = read
        self._what = what

    def describe(self) -> list[Metric]:
        # nothing to read at registration (Redis may be down then)
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self._read())
        except Exception as e:  # a scrape must never fail because Redis is down
            log.warning("metrics_read_failed", what=self._what, error=f"{type(e).__name__}: {e}")
            return
        yield from families


class MetricsBase:
    """A process's metrics: ``registry`` is what the HTTP endpoint exposes."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.inner = CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WithWorkerLabel(self.inner, worker))
        info = Gauge(
            f"{PREFIX}_worker_info",
            "Always 1; labels name the version.",
            ["version"],
            registry=self.inner,
        )
        info.labels(version=__version__).set(1)
        self.last_heartbeat = Gauge(
            f"{PREFIX}_worker_last_heartbeat_timestamp_seconds",
            "Unix time of the worker's last heartbeat that reached Redis.",
            registry=self.inner,
        )

    def add_gauges(self, read: Callable[[], Iterable[GaugeMetricFamily]], what: str) -> None:
        """Export gauges that ``read`` builds at every scrape."""
        self.inner.register(Gauges(read, what))

    def heartbeat(self) -> None:
        """Record a heartbeat that reached Redis."""
        self.last_heartbeat.set(time.time())


class WorkerMetrics(MetricsBase):
    """The GPU worker's metrics; its methods are the hooks the runner and registry call."""

    def __init__(self, worker: str) -> None:
        super().__init__(worker)
        r = self.inner
        job_labels = ["kind", "model"]
        self.jobs = Counter(
            f"{PREFIX}_jobs",
            "Jobs finished, by final status.",
            [*job_labels, "status"],
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_job_queue_wait_seconds",
            "Time from submit to start.",
            job_labels,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference = Histogram(
            f"{PREFIX}_job_inference_seconds",
            "Time the model spent on the job.",
            job_labels,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens_generated",
            "Tokens generated (completion tokens).",
            job_labels,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", job_labels, registry=r
        )
        self.load_seconds = Histogram(
            f"{PREFIX}_model_load_seconds",
            "Model load time (process start, imports, weights).",
            ["model"],
            buckets=LOAD_BUCKETS_S,
            registry=r,
        )
        self.loads = Counter(f"{PREFIX}_model_loads", "Models loaded.", ["model"], registry=r)
        self.evictions = Counter(
            f"{PREFIX}_model_evictions",
            "Models unloaded, by reason: lru, out_of_memory, over_budget, idle, keep_alive, "
            "requested, crashed, timeout, shutdown.",
            ["reason"],
            registry=r,
        )
        self.load_failures = Counter(
            f"{PREFIX}_model_load_failures", "Model loads that failed.", ["model"], registry=r
        )
        memory_doc = "measured in the model's process after its load or its last job"
        self.memory_active = Gauge(
            f"{PREFIX}_device_memory_active_bytes",
            f"MLX active memory, {memory_doc}.",
            ["model"],
            registry=r,
        )
        self.memory_peak = Gauge(
            f"{PREFIX}_device_memory_peak_bytes",
            f"MLX peak memory of the last job, {memory_doc}.",
            ["model"],
            registry=r,
        )
        self.memory_cache = Gauge(
            f"{PREFIX}_device_memory_cache_bytes",
            f"MLX buffer cache, {memory_doc}.",
            ["model"],
            registry=r,
        )
        self.busy = Gauge(f"{PREFIX}_worker_busy", "1 while a job runs, else 0.", registry=r)

    # ----- runner hook -------------------------------------------------------------------

    def job_finished(self, status: str, kind: str, model: str, metrics: Mapping[str, Any]) -> None:
        """A job reached a final status; ``metrics`` is the job document's metrics."""
        self.jobs.labels(kind, model, status).inc()
        if (wait := _number(metrics.get("queue_wait_ms"))) is not None:
            self.queue_wait.labels(kind, model).observe(wait / 1000)
        if (spent := _number(metrics.get("inference_ms"))) is not None:
            self.inference.labels(kind, model).observe(spent / 1000)
        if (made := _number(metrics.get("completion_tokens"))) is not None:
            self.tokens.labels(kind, model).inc(made)
        if (read := _number(metrics.get("prompt_tokens"))) is not None:
            self.prompt_tokens.labels(kind, model).inc(read)

    # ----- registry events ---------------------------------------------------------------

    def model_loaded(self, model: str, load_s: float, memory: Any) -> None:
        """A model finished loading (``memory``: its ``MemoryReport``)."""
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).observe(load_s)
        self.model_memory(model, memory)

    def model_memory(self, model: str, memory: Any) -> None:
        """The model's process measured its memory (after a load or a job)."""
        self.memory_active.labels(model).set(memory.active_bytes)
        self.memory_peak.labels(model).set(memory.peak_bytes)
        self.memory_cache.labels(model).set(memory.cache_bytes)

    def model_unloaded(self, model: str, cause: str) -> None:
        """A model was unloaded or evicted for ``cause``."""
        self.evictions.labels(cause).inc()
        for gauge in (self.memory_active, self.memory_peak, self.memory_cache):
            with contextlib.suppress(KeyError):
                gauge.remove(model)

    def model_load_failed(self, model: str) -> None:
        """A model failed to load."""
        self.load_failures.labels(model).inc()


class WebhookMetrics(MetricsBase):
    """The webhook worker's metrics."""

    def __init__(self, worker: str) -> None:
        super().__init__(worker)
        self.attempts = Counter(
            f"{PREFIX}_webhook_attempts",
            "Delivery attempts, by outcome: delivered, retry, failed.",
            ["outcome"],
            registry=self.inner,
        )
        self.deliveries = Counter(
            f"{PREFIX}_webhook_deliveries",
            "Deliveries that ended: delivered or failed for good.",
            ["result"],
            registry=self.inner,
        )
        self.attempt_seconds = Histogram(
            f"{PREFIX}_webhook_attempt_seconds",
            "Duration of one delivery attempt.",
            buckets=WEBHOOK_BUCKETS_S,
            registry=self.inner,
        )

    def attempt_made(self, state: str, duration_s: float) -> None:
        """An attempt was made and recorded; ``state`` is the delivery's state after it."""
        outcome = _ATTEMPT_OUTCOME.get(state)
        if outcome is None:
            return
        self.attempts.labels(outcome).inc()
        self.attempt_seconds.observe(duration_s)
        if (result := _FINAL_STATE_RESULT.get(state)) is not None:
            self.deliveries.labels(result).inc()


def registry_gauges(snapshot: Callable[[], Mapping[str, Any]]) -> Callable[[], list[Any]]:
    """Gauges of the model registry's ``snapshot()``: models loaded, bytes per model, budget."""

    def read() -> list[Any]:
        snap = snapshot()
        loaded = GaugeMetricFamily(f"{PREFIX}_models_loaded", "Models loaded (or loading).")
        loaded.add_metric([], len(snap["models"]))
        sizes = GaugeMetricFamily(
            f"{PREFIX}_model_bytes",
            "Bytes the registry counts for each loaded model.",
            labels=["model"],
        )
        for m in snap["models"]:
            sizes.add_metric([m["id"]], m["bytes"])
        budget = GaugeMetricFamily(f"{PREFIX}_memory_budget_bytes", "The registry's budget.")
        budget.add_metric([], snap["budget_bytes"])
        used = GaugeMetricFamily(f"{PREFIX}_memory_used_bytes", "Bytes counted against it.")
        used.add_metric([], snap["used_bytes"])
        return [loaded, sizes, budget, used]

    return read


def queue_gauges(queues: Callable[[], Iterable[Mapping[str, Any]]]) -> Callable[[], list[Any]]:
    """Gauges of queue depth and oldest waiting job, from ``inspect.queue_status``-shaped rows."""

    def read() -> list[Any]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Jobs waiting in the queue.", labels=["queue"]
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_age_seconds",
            "Age of the job at the head of the queue (0 when empty).",
            labels=["queue"],
        )
        for q in queues():
            depth.add_metric([q["name"]], q["depth"])
            age.add_metric([q["name"]], q.get("oldest_age_s") or 0.0)
        return [depth, age]

    return read


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# ----- the HTTP endpoint -------------------------------------------------------------------

Health = Callable[[], tuple[bool, dict[str, Any]]]
"""Returns (healthy, details for the JSON body)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _app(registry: CollectorRegistry, health: Health) -> Any:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            try:
                healthy, details = health()
            except Exception as e:  # an unanswerable health check is an unhealthy worker
                healthy, details = False, {"error": f"{type(e).__name__}: {e}"}
            body = json.dumps({"healthy": healthy, **details}, default=str).encode()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics or /healthz\n"]

    return app


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP in daemon threads."""

    def __init__(self, registry: CollectorRegistry, health: Health, host: str, port: int) -> None:
        try:
            self._server = make_server(
                host,
                port,
                _app(registry, health),
                server_class=_Server6 if ":" in host else _Server,
                handler_class=_QuietHandler,
            )
        except OSError as e:
            raise FusionError(
                f"cannot serve metrics on {host}:{port} (FUSION_METRICS_PORT): {e}"
            ) from e
        self.port = int(self._server.server_address[1])
        self.host = host
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fusion-metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        """Start serving; returns self."""
        self._thread.start()
        log.info("metrics_serving", url=f"http://{self.host}:{self.port}/metrics")
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
