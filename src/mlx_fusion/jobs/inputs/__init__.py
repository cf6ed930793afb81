"""The ``input`` of each job kind: the OpenAI request body of its endpoint, one module per family
(``text``: chat and text completions; others arrive with their kinds). Validated before anything
runs; unknown fields are refused rather than silently ignored."""

from __future__ import annotations

from typing import Any

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
]


def describe_validation_error(errors: list[Any], prefix: str) -> tuple[str, str]:
    """(field, reason) of the first pydantic error, the field as a dotted path under ``prefix``."""
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    field = f"{prefix}.{loc}" if loc and prefix else (loc or prefix)
    return field, str(first.get("msg", "invalid"))
