"""The model registry: resolves a job's model through the catalog and leases a loaded model.

This is the plain in-process cache of the worker spine; the process-per-model LRU registry with a
memory budget replaces ``LocalRegistry`` behind the same ``lease`` interface.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from mlx_fusion.errors import FusionError, ModelKindMismatch, ModelLoadError
from mlx_fusion.jobs.document import Kind
from mlx_fusion.registry.catalog import Catalog, ModelKind, ModelSpec
from mlx_fusion.registry.kinds import KINDS, KindModule

__all__ = ["Catalog", "Lease", "LocalRegistry", "ModelKind", "ModelSpec"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Lease:
    """A loaded model held for the length of one job."""

    spec: ModelSpec
    kind: KindModule
    model: Any
    load_ms: float
    """Time spent loading for this job (0.0 when the model was already loaded)."""


class LocalRegistry:
    """Loaded models kept in this process, keyed by model id (no eviction)."""

    def __init__(self, catalog: Catalog, kinds: Mapping[ModelKind, KindModule] = KINDS) -> None:
        self.catalog = catalog
        self._kinds = kinds
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, job_kind: Kind) -> ModelSpec:
        """The catalog entry a job names, checked against the job's kind."""
        spec = self.catalog.resolve(name)
        if job_kind not in self._kinds[spec.kind].JOB_KINDS:
            raise ModelKindMismatch(
                f"model {spec.id!r} is a {spec.kind.value!r} model and cannot run "
                f"{job_kind.value!r} jobs",
                field="model",
            )
        return spec

    @contextmanager
    def lease(self, spec: ModelSpec) -> Iterator[Lease]:
        """Hold the loaded model for one job, loading it first if needed."""
        kind = self._kinds[spec.kind]
        load_ms = 0.0
        with self._lock:
            model = self._loaded.get(spec.id)
            if model is None:
                start = time.perf_counter()
                try:
                    model = kind.load(spec)
                except FusionError:
                    raise
                except Exception as e:
                    raise ModelLoadError(f"model {spec.id!r}: {type(e).__name__}: {e}") from e
                load_ms = round((time.perf_counter() - start) * 1000, 3)
                self._loaded[spec.id] = model
                log.info("model_loaded", model=spec.id, load_ms=load_ms)
        yield Lease(spec=spec, kind=kind, model=model, load_ms=load_ms)

    def loaded(self) -> list[str]:
        """Ids of the models loaded now."""
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        """Forget every loaded model."""
        with self._lock:
            self._loaded.clear()
