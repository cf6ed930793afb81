"""Standard Webhooks signatures (https://www.standardwebhooks.com), with the standard library.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; the signature is
``v1,`` + base64(HMAC-SHA256(secret, content)). Secrets are ``whsec_`` + base64 of the key bytes.
While secrets rotate, a message carries one signature per active secret, space-separated, and a
receiver accepts it when any one matches a secret it knows. ``verify`` is what receivers call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence

from mlx_fusion.errors import WebhookVerificationError

SECRET_PREFIX = "whsec_"
"""Prefix of a webhook secret; the rest is base64 of the key bytes."""

SIGNATURE_VERSION = "v1"
"""The only signature scheme: HMAC-SHA256."""

DEFAULT_TOLERANCE_S = 300
"""How far ``webhook-timestamp`` may be from the receiver's clock (either way)."""


def generate_secret(nbytes: int = 32) -> str:
    """A new random secret in ``whsec_`` form."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret (the prefix is optional); ``ValueError`` if invalid."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as e:
        raise ValueError("webhook secret is not valid base64 after 'whsec_'") from e
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _as_list(secret_or_secrets: str | Sequence[str]) -> list[str]:
    if isinstance(secret_or_secrets, str):
        return [secret_or_secrets]
    out = list(secret_or_secrets)
    if not out:
        raise ValueError("no webhook secret given")
    return out


def sign(body: bytes, msg_id: str, timestamp: int, secret: str) -> str:
    """The ``v1,<base64>`` signature of one message under one secret."""
    content = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def headers(
    body: bytes, msg_id: str, timestamp: int, secret_or_secrets: str | Sequence[str]
) -> dict[str, str]:
    """``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` for one attempt; with
    several secrets (rotation) the signature header holds one signature per secret."""
    signatures = [sign(body, msg_id, timestamp, s) for s in _as_list(secret_or_secrets)]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": " ".join(signatures),
    }


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret_or_secrets: str | Sequence[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received webhook; raises ``WebhookVerificationError`` unless one of its signatures
    matches one of the secrets and its timestamp is within ``tolerance_s`` of ``now``."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    ts_text = lowered.get("webhook-timestamp")
    sig_text = lowered.get("webhook-signature")
    if not (msg_id and ts_text and sig_text):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(ts_text.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is in the future")

    received: list[bytes] = []
    for item in sig_text.split():
        version, _, encoded = item.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            received.append(base64.b64decode(encoded, validate=True))
        except binascii.Error:
            continue
    for secret in _as_list(secret_or_secrets):
        expected = base64.b64decode(sign(raw, msg_id, timestamp, secret).partition(",")[2])
        if any(hmac.compare_digest(expected, sig) for sig in received):
            return
    raise WebhookVerificationError("no signature matches")
