"""Model kinds, one module each, exporting ``JOB_KINDS``, ``load(spec)`` and ``run(model, job)``.

``KINDS`` maps a catalog kind to its module; registries take the map as an argument so a test can
replace it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.catalog import ModelKind, ModelSpec
from mlx_fusion.registry.kinds import lm


class KindModule(Protocol):
    """What every kind module provides."""

    JOB_KINDS: frozenset[Kind]

    def load(self, spec: ModelSpec) -> Any: ...

    def run(self, model: Any, job: Job) -> tuple[dict[str, Any], dict[str, Any]]: ...


KINDS: Mapping[ModelKind, KindModule] = {ModelKind.LM: lm}
"""The kind module of each catalog kind."""
