"""Logging: structlog for our events and the standard library's (RQ's) through one handler, as
JSON lines in production or readable console output on a terminal.

- Context bound with ``structlog.contextvars`` (``job_id``, ``request_id``, ``model``, ``kind``,
  ``worker`` for the length of a job) goes into every line, RQ's own included.
- A model process logs the same way (``configure_child``), and the worker sends the context of
  the job along with it, so its lines carry the same fields.
- Every secret in the settings (URL passwords, webhook secrets) is replaced by ``[REDACTED]``
  wherever it would appear in a line, as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import quote, unquote, urlsplit

import structlog

from mlx_fusion.config import Settings

REDACTED = "[REDACTED]"
MIN_SECRET_CHARS = 6
"""Shorter secret fragments are not redacted (they would blank out ordinary words)."""


def secrets_of(settings: Settings) -> list[str]:
    """Every secret string the settings hold: URL passwords and webhook secrets (with their
    base64 body, which is what a careless log of a decoded key would show)."""
    found: list[str] = []
    for url in (settings.redis_url, settings.mongo_url):
        if not url:
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password), quote(password, safe="")]
    for secret in [
        *settings.webhook_secrets,
        *(s for items in settings.webhook_named_secrets.values() for s in items),
    ]:
        value = secret.get_secret_value()
        found += [value, value.removeprefix("whsec_")]
    return sorted({s for s in found if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)


class Redact:
    """A structlog processor replacing each of ``secrets`` in every string of the event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = [s for s in secrets if len(s) >= MIN_SECRET_CHARS]

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, Mapping):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, logger: Any, name: str, event_dict: Any) -> Any:
        if not self._secrets:
            return event_dict
        return {k: self._clean(v) for k, v in event_dict.items()}


def use_json(fmt: str, stream: TextIO) -> bool:
    """Whether ``fmt`` (auto, json, console) means JSON lines on ``stream``."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return fmt == "json"


def configure(
    fmt: str = "auto",
    level: str = "INFO",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Send structlog and standard-library logging to ``stream`` (stderr) in one format."""
    out = stream or sys.stderr
    json_lines = use_json(fmt, out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=bool(getattr(out, "isatty", lambda: False)()))
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            Redact(secrets),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def configure_from(settings: Settings, *, json_logs: bool = False) -> None:
    """``configure`` with the settings' format, level and secrets (``json_logs`` forces JSON)."""
    configure(
        "json" if json_logs else settings.log_format,
        settings.log_level,
        secrets=secrets_of(settings),
    )


def child_config() -> dict[str, Any]:
    """How this process logs, for a model process to log the same way (no secrets: a model
    process never sees the settings)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, logging.StreamHandler)), None)
    formatter = getattr(handler, "formatter", None)
    renderer = getattr(formatter, "processors", [None])[-1] if formatter is not None else None
    return {
        "fmt": "json" if isinstance(renderer, structlog.processors.JSONRenderer) else "console",
        "level": logging.getLevelName(root.level) if handler is not None else "INFO",
        "configured": handler is not None,
    }


def configure_child(config: Mapping[str, Any]) -> None:
    """In a model process: log as the worker does (``child_config``)."""
    if config.get("configured"):
        configure(str(config.get("fmt", "json")), str(config.get("level", "INFO")))
