"""The webhook worker (``mlx-fusion webhook-worker``): an RQ ``SimpleWorker`` on the webhook
queue that makes delivery attempts, and never imports MLX or touches a GPU.

It runs only ``mlx_fusion.webhooks.delivery.deliver(job_id, attempt)`` (``WebhookJob``), runs
RQ's scheduler (which moves delayed retries back to the queue; it forks, which is safe in a
process that never touched a GPU), and reconciles the outbox on start and every
``webhook_reconcile_interval_s``. Several webhook workers may serve one queue; one of them holds
the scheduler lock at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import structlog
from rq.defaults import DEFAULT_WORKER_TTL
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from mlx_fusion import defaults
from mlx_fusion.config import Settings
from mlx_fusion.webhooks.delivery import Deliverer, deliver, serving
from mlx_fusion.webhooks.outbox import Outbox
from mlx_fusion.worker import (
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


class WebhookWorker(SimpleWorker):
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
        interval = max(1, math.ceil(self.settings.webhook_reconcile_interval_s))
        kwargs = worker_options(
            self.settings, kwargs, WebhookJob, f"webhooks.{unique_worker_name()}"
        )
        kwargs.setdefault("maintenance_interval", interval)
        # the worker blocks on the queue for worker_ttl - 15 s between maintenance runs
        kwargs.setdefault("worker_ttl", min(DEFAULT_WORKER_TTL, interval + 15))
        names = queue_names_of(queues) or [self.settings.webhook_queue_name()]
        super().__init__(names, *args, **kwargs)
        if deliverer is None:
            outbox = Outbox(self.settings, connect_store(self.settings), self.connection)
            deliverer = Deliverer(self.settings, outbox)
        self.deliverer = deliverer

    def reconcile(self) -> int:
        """Queue lost deliveries now; a store or Redis outage is logged, not raised."""
        try:
            return self.deliverer.outbox.reconcile()
        except Exception as e:  # the store or Redis being down must not stop the worker
            log.warning("webhook_reconcile_failed", error=f"{type(e).__name__}: {e}")
            return 0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        kwargs["with_scheduler"] = bool(kwargs.get("with_scheduler")) and self.run_scheduler
        with serving(self.deliverer):  # RQ's loop runs maintenance (the reconciler) first
            return bool(super().work(*args, **kwargs))

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        self.reconcile()


class WebhookWorkerWithoutScheduler(WebhookWorker):
    """A webhook worker that leaves RQ's scheduler to ``mlx-fusion scheduler``."""

    run_scheduler = False


def run_pool(settings: Settings, processes: int, *, scheduler: bool, burst: bool) -> None:
    """Run ``processes`` webhook workers under RQ's ``WorkerPool`` (forked, which is safe: no
    GPU here), restarting any that dies; one of them holds the scheduler lock."""
    from rq.worker_pool import WorkerPool

    from mlx_fusion.services import redis_connection

    pool = WorkerPool(
        [settings.webhook_queue_name()],
        connection=redis_connection(settings),
        num_workers=processes,
        worker_class=WebhookWorker if scheduler else WebhookWorkerWithoutScheduler,
        serializer=JSONSerializer,
        job_class=WebhookJob,
    )
    pool.start(burst=burst)
