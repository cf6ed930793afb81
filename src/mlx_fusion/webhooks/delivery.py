"""One delivery attempt: claim it, sign the event, POST it through the guarded client, record
what happened, and schedule the next attempt when there is one.

Only a 2xx answer delivers. A 3xx is a failure (redirects are never followed); ``410 Gone`` ends
the delivery at once; a refused target (see ``guard``) or an unknown secret name ends it too,
since retrying cannot help. Anything else is retried after the next wait of the schedule,
stretched by jitter and never sooner than the receiver's ``Retry-After``; when the schedule is
used up the delivery ends ``failed``. At most ``webhook_max_response_bytes`` of a response body
are read. The decisions are pure functions (``retry_delay_s``, ``parse_retry_after``,
``next_step``); ``Deliverer`` does the I/O.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import email.utils
import random
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from rq.timeouts import JobTimeoutException

from mlx_fusion import __version__, defaults
from mlx_fusion.config import Settings
from mlx_fusion.errors import WebhookDeliveryError, WebhookTargetRefused
from mlx_fusion.jobs.store import Document, utcnow
from mlx_fusion.webhooks.events import build_event, encode_event
from mlx_fusion.webhooks.guard import Resolver, guarded_client
from mlx_fusion.webhooks.outbox import (
    DELIVERED,
    FAILED,
    PENDING,
    Outbox,
    claim_update,
    due_time,
    record_update,
)
from mlx_fusion.webhooks.signing import headers as signature_headers

log = structlog.get_logger(__name__)

USER_AGENT = f"mlx-fusion-webhooks/{__version__}"
_RESPONSE_EXCERPT_CHARS = 256


class WebhookGone(WebhookDeliveryError):
    """The receiver answered ``410 Gone``: the URL is not retried."""

    code = "webhook_gone"


class WebhookSecretUnknown(WebhookDeliveryError):
    """The job names a webhook secret the webhook worker does not have (or none is configured)."""

    code = "webhook_secret_unknown"


def retry_delay_s(
    schedule: Sequence[float], index: int, jitter: float, rng: Callable[[], float] = random.random
) -> float:
    """The wait before retry ``index`` (0 = after the first attempt): the schedule's entry
    stretched or shrunk by up to ``jitter`` (a fraction), at random."""
    base = float(schedule[index])
    return max(0.0, base * (1 + jitter * (2 * rng() - 1)))


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds from ``now_s`` that a ``Retry-After`` header asks for (delta-seconds or an HTTP
    date); None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now_s)


@dataclass(frozen=True)
class Step:
    """What an attempt leaves a delivery in: ``state``, the wait before the next attempt when
    it stays pending, and the final error when it failed."""

    state: str
    delay_s: float | None = None
    error: dict[str, Any] | None = None


def next_step(
    attempt: Mapping[str, Any],
    attempts_in_round: int,
    schedule: Sequence[float],
    *,
    jitter: float,
    retry_after_max_s: float = defaults.WEBHOOK_RETRY_AFTER_MAX_S,
    rng: Callable[[], float] = random.random,
) -> Step:
    """Decide what follows an attempt (pure): delivered, failed for good, or retry after a wait."""
    status = attempt.get("status_code")
    error = attempt.get("error") or {}
    if isinstance(status, int) and 200 <= status < 300:
        return Step(DELIVERED)
    if status == 410:
        return Step(FAILED, error=WebhookGone("receiver answered 410 Gone; not retried").to_dict())
    if error.get("code") in (WebhookTargetRefused.code, WebhookSecretUnknown.code):
        return Step(FAILED, error=dict(error))
    if attempts_in_round > len(schedule):
        last = f"HTTP {status}" if status is not None else error.get("message", "no answer")
        message = f"gave up after {attempts_in_round} attempts; last: {last}"
        return Step(FAILED, error=WebhookDeliveryError(message).to_dict())
    delay = retry_delay_s(schedule, attempts_in_round - 1, jitter, rng)
    retry_after = attempt.get("retry_after_s")
    if isinstance(retry_after, (int, float)):
        delay = max(delay, min(float(retry_after), retry_after_max_s))
    return Step(PENDING, delay_s=delay)


def _attempt_error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message[:500]}


class Deliverer:
    """Makes delivery attempts. ``transport`` and ``resolver`` replace the network boundary (the
    socket layer under the guard, and DNS) in tests; ``verify`` is httpx's TLS verification."""

    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        *,
        transport: httpx.BaseTransport | None = None,
        resolver: Resolver = socket.getaddrinfo,
        verify: Any = True,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.store = outbox.store
        self.rng = rng
        self.observe: Callable[[str, float], Any] | None = None
        """Called with (delivery state after the attempt, attempt seconds) for every attempt
        made and recorded (the webhook worker's metrics)."""
        self.client = guarded_client(
            allow=settings.webhook_allow,
            resolver=resolver,
            timeout_s=settings.webhook_timeout_s,
            inner=transport,
            verify=verify,
        )

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    def attempt(self, job_id: str, n: int) -> str:
        """Make attempt ``n`` of job ``job_id``'s delivery; returns the delivery's state after it,
        or ``skipped`` when this attempt is not due (already made, or being made elsewhere)."""
        now = utcnow()
        hold = dt.timedelta(seconds=self.outbox.attempt_timeout_s() + 30)
        qt = self.store.query_time
        record = self.store.transition(claim_update(job_id, n, qt(now), now + hold))
        if record is None:
            log.info("webhook_attempt_skipped", job_id=job_id, attempt=n)
            return "skipped"
        webhook = record["webhook"]
        with structlog.contextvars.bound_contextvars(
            job_id=job_id, request_id=record.get("request_id"), webhook_id=webhook.get("id")
        ):
            try:
                attempt = self._send(record, n)
            except Exception as e:  # a record that cannot be sent must not loop forever
                log.exception("webhook_attempt_crashed", attempt=n)
                attempt = {
                    "n": n,
                    "at": now,
                    "duration_ms": 0.0,
                    "error": _attempt_error("internal_error", f"{type(e).__name__}: {e}"),
                }
            made = n - int(webhook.get("round_start", 1)) + 1
            step = next_step(
                attempt,
                made,
                self.settings.webhook_schedule_s,
                jitter=self.settings.webhook_jitter,
                rng=self.rng,
            )
            finished = utcnow()
            due = due_time(finished, step.delay_s) if step.delay_s is not None else None
            update = record_update(
                job_id, attempt, step.state, finished, next_attempt_at=due, error=step.error
            )
            if self.store.transition(update) is None:
                log.warning("webhook_attempt_unrecorded", attempt=n)
                return "skipped"
            if self.observe is not None:
                self.observe(step.state, attempt["duration_ms"] / 1000)
            log.info(
                "webhook_attempt",
                attempt=n,
                state=step.state,
                status_code=attempt.get("status_code"),
                error=(attempt.get("error") or {}).get("code"),
                duration_ms=attempt["duration_ms"],
            )
            if due is not None:
                self.outbox.enqueue(job_id, n + 1, at=due)
            return step.state

    def _send(self, record: Document, n: int) -> dict[str, Any]:
        webhook = record["webhook"]
        started = utcnow()
        attempt: dict[str, Any] = {"n": n, "at": started}
        t0 = time.monotonic()
        try:
            secrets = self.settings.webhook_signing_secrets(webhook.get("secret"))
        except KeyError:
            name = webhook.get("secret")
            message = (
                f"no webhook secret named {name!r} is configured"
                if name
                else "no webhook secret is configured (FUSION_WEBHOOK_SECRETS)"
            )
            attempt["error"] = WebhookSecretUnknown(message).to_dict()
            attempt["duration_ms"] = 0.0
            return attempt
        body = encode_event(
            build_event(record, max_result_bytes=self.settings.webhook_max_result_bytes)
        )
        request_headers = {
            **signature_headers(body, webhook["id"], int(time.time()), secrets),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        try:
            with self.client.stream(
                "POST", webhook["url"], content=body, headers=request_headers
            ) as response:
                excerpt = self._read_capped(response)
                attempt["status_code"] = response.status_code
                if excerpt:
                    attempt["response"] = excerpt
                retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
                if retry_after is not None:
                    attempt["retry_after_s"] = retry_after
        except WebhookTargetRefused as e:
            attempt["error"] = e.to_dict()
        except (httpx.TimeoutException, JobTimeoutException) as e:
            attempt["error"] = _attempt_error("timeout", f"{type(e).__name__}: {e}")
        except httpx.ConnectError as e:
            attempt["error"] = _attempt_error("connection_failed", f"{e}")
        except httpx.HTTPError as e:
            attempt["error"] = _attempt_error("http_error", f"{type(e).__name__}: {e}")
        attempt["duration_ms"] = round((time.monotonic() - t0) * 1000, 3)
        return attempt

    def _read_capped(self, response: httpx.Response) -> str:
        cap = self.settings.webhook_max_response_bytes
        data = b""
        if cap > 0:
            for chunk in response.iter_raw():
                data += chunk
                if len(data) >= cap:
                    break
        return data[:cap].decode("utf-8", errors="replace")[:_RESPONSE_EXCERPT_CHARS]


_CURRENT: contextvars.ContextVar[Deliverer | None] = contextvars.ContextVar(
    "mlx_fusion_deliverer", default=None
)


def deliver(job_id: str, attempt: int) -> str:
    """The one RQ job function of the webhook queue (``mlx_fusion.webhooks.delivery.deliver``):
    make one attempt; it runs only inside a webhook worker, which supplies the ``Deliverer``."""
    deliverer = _CURRENT.get()
    if deliverer is None:
        raise RuntimeError("mlx_fusion.webhooks.delivery.deliver runs only in a webhook worker")
    return deliverer.attempt(job_id, attempt)


@contextmanager
def serving(deliverer: Deliverer) -> Iterator[None]:
    """Make ``deliver`` use ``deliverer`` for the length of the block."""
    token = _CURRENT.set(deliverer)
    try:
        yield
    finally:
        _CURRENT.reset(token)
