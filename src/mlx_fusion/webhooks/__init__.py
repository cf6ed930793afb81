"""Completion webhooks: signed per Standard Webhooks, delivered at least once, off the GPU path.

- ``events``: the event a finished job sends (pure).
- ``signing``: Standard Webhooks signatures; ``verify`` is for receivers.
- ``guard``: where sending is allowed (public addresses, or the allow-list); an httpx transport
  that connects only to the checked address.
- ``outbox``: the pending delivery inside the job document, attempt jobs on the webhook queue,
  the reconciler, replay.
- ``delivery``: one attempt (claim, sign, POST, record, schedule the next) and the retry rules.
- ``worker``: ``mlx-fusion webhook-worker``, an RQ worker that never imports MLX.

Importing this package loads only ``events`` and ``signing`` (no httpx, no RQ), so receivers can
use ``verify`` with nothing else.
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
