"""The ``input`` of each job kind: the OpenAI request body of its endpoint, one module per family
(``text``: chat and text completions; others arrive with their kinds). Validated before anything
runs; unknown fields are refused rather than silently ignored."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationInfo

from mlx_fusion.jobs.inputs.text import (
    ChatCompletionInput,
    ChatMessage,
    CompletionInput,
    SamplingParams,
)

__all__ = [
    "ChatCompletionInput",
    "ChatMessage",
    "CompletionInput",
    "SamplingParams",
    "describe_validation_error",
    "inline_or_path",
]


def inline_or_path(
    value: str | None, info: ValidationInfo, *, name: str, what: str | None
) -> str | None:
    """A field validator's check of a file a job gives inline (``name``: base64 or a data: URL)
    or by path (``<name>_path``): never both, and one of them when ``what`` names the file."""
    has_path = info.data.get(f"{name}_path") is not None
    if value is None and not has_path and what is not None:
        raise ValueError(f"give the {what} as {name} (base64 or a data: URL) or as {name}_path")
    if value is not None and has_path:
        raise ValueError(f"give {name} or {name}_path, not both")
    return value


def describe_validation_error(errors: list[Any], prefix: str) -> tuple[str, str]:
    """(field, reason) of the first pydantic error, the field as a dotted path under ``prefix``."""
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    field = f"{prefix}.{loc}" if loc and prefix else (loc or prefix)
    return field, str(first.get("msg", "invalid"))
