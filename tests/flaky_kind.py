"""A stand-in model kind for the soak test: each job does what its metadata says: ``ok`` returns
a small result, ``raise`` fails inside the model as a buggy model would, ``big`` returns a result
past the inline limit (stored as a blob)."""

from __future__ import annotations

from typing import Any

from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})


def load(spec: ModelSpec) -> str:
    return spec.id


def run(model: str, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    outcome = job.spec.metadata.get("outcome", "ok")
    if outcome == "raise":
        raise RuntimeError("injected model failure")
    text = "x" * 5000 if outcome == "big" else "ok"
    return {"object": "text_completion", "model": model, "text": text}, {"inference_ms": 0.1}
