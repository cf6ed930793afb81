"""A stand-in model kind whose jobs take a set time (heartbeat, timeout and cancel tests); it
checks for cancellation between steps like the language-model kinds, unless the job's metadata
says ``ignore_cancel``.

It replaces the mlx-lm kind module through the registry's kind map, the lookup tests may replace;
everything else (RQ, Redis, the store, the worker) is real.
"""

from __future__ import annotations

import time
from typing import Any

from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry import cancel
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})


def load(spec: ModelSpec) -> str:
    return spec.id


def run(model: str, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    seconds = float(job.spec.metadata.get("sleep_s", "0"))
    stubborn = job.spec.metadata.get("ignore_cancel") == "1"  # like a kind stuck in native code
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not stubborn:
            cancel.check()  # as language models do between tokens
        time.sleep(0.05)
    return {"object": "text_completion", "model": model, "slept_s": seconds}, {"inference_ms": 1}
