"""Webhook events: pure functions from a finished job record to the event that is POSTed.

An event is ``{type, timestamp, data}`` with ``type`` one of ``job.completed``, ``job.failed``,
``job.cancelled``. ``timestamp`` is the job's ``finished_at``, so the body is the same on every
retry; only the ``webhook-timestamp`` header changes per attempt. Results go inline only when their
JSON fits ``max_result_bytes``; otherwise the event carries a reference that Tier 2 resolves with
``Client.get_result(id)``. Image bytes are never in a record (images are blobs), so never here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

EVENT_TYPES = {
    "completed": "job.completed",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
"""Final job status -> webhook event type."""


def event_type(status: str) -> str:
    """The event type of a finished job's status; ``ValueError`` for a status that is not final."""
    try:
        return EVENT_TYPES[status]
    except KeyError:
        raise ValueError(f"no webhook event for a job in status {status!r}") from None


def event_id(job_id: str, event_type: str) -> str:
    """The ``webhook-id`` of this job's event: the same on every retry, so receivers can dedupe."""
    digest = hashlib.sha256(f"{job_id}\x00{event_type}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        text = value.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        return text.removesuffix("+00:00") + "Z"
    return value


def result_bytes(result: Any) -> int:
    """Size of a result as compact JSON (how the job store measures it)."""
    return len(json.dumps(result, separators=(",", ":"), default=str).encode())


def build_event(record: Mapping[str, Any], *, max_result_bytes: int) -> dict[str, Any]:
    """The event for a finished job record (``id`` or ``_id``); pure, no I/O.

    ``data.result`` is present for a completed job whose result fits ``max_result_bytes``;
    otherwise ``data.result_ref`` is ``{job_id, bytes}`` (plus ``blob_id`` and ``content_type``
    when the record already keeps the result as a blob). ``data.error`` is present when failed.
    """
    job_id = str(record.get("id") or record.get("_id") or "")
    if not job_id:
        raise ValueError("job record has no id")
    status = str(record.get("status"))
    etype = event_type(status)
    data: dict[str, Any] = {
        "id": job_id,
        "status": status,
        "model": record.get("model"),
        "kind": record.get("kind"),
        "request_id": record.get("request_id"),
        "metadata": dict(record.get("metadata") or {}),
    }
    if record.get("error") is not None:
        data["error"] = dict(record["error"])
    if status == "completed":
        stored_ref = record.get("result_ref")
        if stored_ref:
            data["result_ref"] = {"job_id": job_id, **dict(stored_ref)}
        elif "result" in record:
            result = record["result"]
            size = result_bytes(result)
            if size <= max_result_bytes:
                data["result"] = result
            else:
                data["result_ref"] = {"job_id": job_id, "bytes": size}
    timestamp = record.get("finished_at") or record.get("updated_at")
    return {"type": etype, "timestamp": _iso(timestamp), "data": data}


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The request body: compact JSON, keys in a fixed order (datetimes as ISO strings)."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _iso(value)
    return str(value)
