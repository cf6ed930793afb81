"""The webhook worker (``mlx-fusion webhook-worker``): an RQ ``SimpleWorker`` on the webhook
queue that makes delivery attempts, and never imports MLX or touches a GPU.

It runs only ``mlx_fusion.webhooks.delivery.deliver(job_id, attempt)`` (``WebhookJob``), runs
RQ's scheduler (which moves delayed retries back to the queue; it forks, which is safe in a
process that never touched a GPU), and reconciles the outbox on start and every
``webhook_reconcile_interval_s``. Several webhook workers may serve one queue; one of them holds
the scheduler lock at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import structlog
from rq.queue import Queue
from rq.serializers import JSONSerializer

from mlx_fusion import defaults
from mlx_fusion.config import Settings
from mlx_fusion.jobs.store import utcnow
from mlx_fusion.metrics import (
    Gauges,
    MetricsServer,
    WebhookMetrics,
    WithWorkerLabel,
    queue_gauges,
)
from mlx_fusion.webhooks.delivery import Deliverer, deliver, serving
from mlx_fusion.webhooks.outbox import Outbox
from mlx_fusion.worker import (
    MonitoredWorker,
    WhitelistedJob,
    queue_names_of,
    unique_worker_name,
    worker_options,
)

log = structlog.get_logger(__name__)


class WebhookJob(WhitelistedJob):
    """An RQ job that can only ever run ``deliver(job_id, attempt)``."""

    allowed_function = defaults.WEBHOOK_FUNCTION
    arg_types = (str, int)
    args_description = "[job_id, attempt] as its arguments"

    def _execute(self) -> Any:
        problem = self.refusal()
        if problem is not None:
            log.warning("webhook_job_refused", rq_job_id=self.id, error=problem.message)
            raise problem
        job_id, attempt = self.arguments() or ("", 0)
        return deliver(job_id, attempt)


class WebhookWorker(MonitoredWorker):
    """Serves the webhook queue (see the module docstring)."""

    job_class = WebhookJob
    run_scheduler = True
    """False: never run RQ's scheduler here, whatever ``work`` is asked (a separate
    ``mlx-fusion scheduler`` moves the retries)."""

    def __init__(
        self,
        queues: Sequence[str | Queue] | str | Queue | None = None,
        *args: Any,
        settings: Settings | None = None,
        deliverer: Deliverer | None = None,
        **kwargs: Any,
    ) -> None:
        from mlx_fusion.jobs.backends import connect_store

        self.settings = settings or Settings()
        kwargs = worker_options(
            self.settings, kwargs, WebhookJob, f"webhooks.{unique_worker_name()}"
        )
        kwargs.setdefault("maintenance_interval", self.settings.maintenance_interval_s("webhook"))
        kwargs.setdefault("worker_ttl", self.settings.worker_ttl_s("webhook"))
        names = queue_names_of(queues) or [self.settings.webhook_queue_name()]
        super().__init__(names, *args, **kwargs)
        if deliverer is None:
            outbox = Outbox(self.settings, connect_store(self.settings), self.connection)
            deliverer = Deliverer(self.settings, outbox)
        self.deliverer = deliverer
        self.metrics = WebhookMetrics(self.name)
        deliverer.observe = self.metrics.attempt_made
        self.metrics.add_gauges(queue_gauges(self._queue_rows), "queues")

    def _queue_rows(self) -> list[dict[str, Any]]:
        from mlx_fusion.inspect import queue_status

        names = self.queue_names()
        rows = queue_status(self.connection, self.settings, utcnow())
        return [q for q in rows if q["name"] in names]

    def reconcile(self) -> int:
        """Queue lost deliveries now; a store or Redis outage is logged, not raised."""
        try:
            return self.deliverer.outbox.reconcile()
        except Exception as e:  # the store or Redis being down must not stop the worker
            log.warning("webhook_reconcile_failed", error=f"{type(e).__name__}: {e}")
            return 0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        kwargs["with_scheduler"] = bool(kwargs.get("with_scheduler")) and self.run_scheduler
        # RQ's loop runs maintenance (the reconciler) first
        with serving(self.deliverer), self.serving_metrics():
            return bool(super().work(*args, **kwargs))

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        self.reconcile()


class WebhookWorkerWithoutScheduler(WebhookWorker):
    """A webhook worker that leaves RQ's scheduler to ``mlx-fusion scheduler``."""

    run_scheduler = False


def run_pool(settings: Settings, processes: int, *, scheduler: bool, burst: bool) -> None:
    """Run ``processes`` webhook workers under RQ's ``WorkerPool`` (forked, which is safe: no
    GPU here), restarting any that dies; one of them holds the scheduler lock. With a metrics
    port, this process serves the metrics of them all (Prometheus multiprocess mode)."""
    from rq.worker_pool import WorkerPool

    from mlx_fusion.services import redis_connection

    base = WebhookWorker if scheduler else WebhookWorkerWithoutScheduler
    connection = redis_connection(settings)
    pool = WorkerPool(
        [settings.webhook_queue_name()],
        connection=connection,
        num_workers=processes,
        worker_class=type(f"Pooled{base.__name__}", (base,), {"serves_metrics": False}),
        serializer=JSONSerializer,
        job_class=WebhookJob,
    )
    with ExitStack() as stack:
        if settings.metrics_port is not None:
            stack.enter_context(_pool_metrics(settings, connection, pool))
        pool.start(burst=burst)


@contextmanager
def _pool_metrics(settings: Settings, connection: Any, pool: Any) -> Iterator[None]:
    from prometheus_client import CollectorRegistry, values
    from prometheus_client.multiprocess import MultiProcessCollector
    from rq.worker import Worker

    directory = tempfile.mkdtemp(prefix="mlx-fusion-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # the forked workers' metrics go to files there
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    gathered = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(gathered, path=directory)  # type: ignore[no-untyped-call]
    name = f"webhooks.pool.{pool.name}"
    exported = CollectorRegistry(auto_describe=False)
    exported.register(WithWorkerLabel(gathered, name))
    queue = settings.webhook_queue_name()

    def queues() -> list[dict[str, Any]]:
        from mlx_fusion.inspect import queue_status

        return [q for q in queue_status(connection, settings, utcnow()) if q["name"] == queue]

    inner = CollectorRegistry(auto_describe=False)
    inner.register(Gauges(queue_gauges(queues), "queues"))
    exported.register(WithWorkerLabel(inner, name))
    max_age = settings.health_max_age_s or float(settings.worker_ttl_s("webhook"))

    def health() -> tuple[bool, dict[str, Any]]:
        now = utcnow()
        ages = {
            w.name: (now - w.last_heartbeat).total_seconds()
            for w in Worker.all(connection=connection, serializer=JSONSerializer)
            if w.name in pool.worker_dict and w.last_heartbeat is not None
        }
        fresh = [a for a in ages.values() if a <= max_age]
        return bool(fresh), {"worker": name, "heartbeat_age_s": ages, "max_age_s": max_age}

    server = MetricsServer(exported, health, settings.metrics_host, settings.metrics_port or 0)
    server.start()
    try:
        yield
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
