"""A stand-in model kind that misbehaves on request (for model-process tests).

``load`` acts on the model id: ``fail-load`` raises, ``oom-load`` raises an MLX allocation error,
``exit-load`` exits the process, ``slow-load`` never finishes, ``stubborn`` ignores SIGTERM; any
other id loads at once. ``run`` acts on ``metadata.action``: ``sleep`` (``metadata.sleep_s``),
``raise``, ``invalid``, ``oom``, ``print``; anything else answers at once.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from mlx_fusion.errors import InvalidInput
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})


def load(spec: ModelSpec) -> str:
    if spec.id == "fail-load":
        raise ValueError("no weights here")
    if spec.id == "oom-load":
        raise RuntimeError("[malloc] Unable to allocate 1073741824 bytes.")
    if spec.id == "exit-load":
        os._exit(3)
    if spec.id == "slow-load":
        time.sleep(60)
    if spec.id == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return spec.id


def run(model: str, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    action = job.spec.metadata.get("action", "")
    if action == "sleep":
        time.sleep(float(job.spec.metadata.get("sleep_s", "0")))
    elif action == "raise":
        raise RuntimeError("device lost")
    elif action == "invalid":
        raise InvalidInput("too hot", field="input.temperature")
    elif action == "oom":
        raise RuntimeError("[metal::malloc] Attempting to allocate 103918075904 bytes")
    elif action == "print":
        print("noise from the model", flush=True)
    return {"object": "text_completion", "model": model, "pid": os.getpid()}, {"inference_ms": 1}
