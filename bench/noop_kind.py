"""A model kind that does no work: what is left of a job's time is mlx-fusion's own path."""

from __future__ import annotations

from typing import Any

from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.COMPLETION, Kind.CHAT_COMPLETION})


def load(spec: ModelSpec) -> str:
    return spec.id


def run(model: str, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"object": "text_completion", "model": model, "choices": []}, {"inference_ms": 0.0}


def noop() -> None:
    """The stock RQ baseline's job function."""
