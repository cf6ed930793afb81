"""A stand-in model kind whose model raises while running (a bug or a device error)."""

from __future__ import annotations

from typing import Any

from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})


def load(spec: ModelSpec) -> str:
    return spec.id


def run(model: str, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    raise RuntimeError("device lost")
