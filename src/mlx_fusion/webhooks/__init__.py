"""Completion webhooks (signed per Standard Webhooks, retried): built in their own issue.

The job document already carries ``webhook {url}``; delivery is not wired yet. The pure core is
here: ``events`` (what is sent), ``signing`` (Standard Webhooks signatures; ``verify`` is for
receivers) and ``guard`` (where sending is allowed; imported on its own, it needs httpx).
"""

from mlx_fusion.errors import WebhookVerificationError
from mlx_fusion.webhooks.events import build_event, encode_event, event_id
from mlx_fusion.webhooks.signing import sign, verify

__all__ = [
    "WebhookVerificationError",
    "build_event",
    "encode_event",
    "event_id",
    "sign",
    "verify",
]
