"""Model kinds, one module each, exporting ``JOB_KINDS``, ``load(spec)`` and ``run(model, job)``,
and optionally ``prepare(job, settings) -> job`` and ``finish(job, result, put) -> result``.

``run`` executes in the model's process. ``prepare`` executes in the worker process before the
job is sent there (it must not import MLX): it resolves what the job references, such as a file
under the allowed input folder, into inline data, so a model process never opens a path a job
supplied. ``KINDS`` maps a catalog kind to its module, imported when first needed; registries
take the map as an argument so a test can replace it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.catalog import ModelKind, ModelSpec


class KindModule(Protocol):
    """What every kind module provides."""

    JOB_KINDS: frozenset[Kind]

    def load(self, spec: ModelSpec) -> Any: ...

    def run(self, model: Any, job: Job) -> tuple[dict[str, Any], dict[str, Any]]: ...


KIND_MODULES: dict[ModelKind, str] = {
    ModelKind.LM: "mlx_fusion.registry.kinds.lm",
    ModelKind.VLM: "mlx_fusion.registry.kinds.vlm",
    ModelKind.EMBEDDINGS: "mlx_fusion.registry.kinds.embeddings",
    ModelKind.WHISPER: "mlx_fusion.registry.kinds.whisper",
    ModelKind.IMAGE_GENERATION: "mlx_fusion.registry.kinds.image",
    ModelKind.IMAGE_EDIT: "mlx_fusion.registry.kinds.image",
}
"""The module of each catalog kind."""


class _LazyKinds(Mapping[ModelKind, KindModule]):
    """``KIND_MODULES`` imported on first use; a kind whose module this version lacks is absent."""

    def __getitem__(self, kind: ModelKind) -> KindModule:
        name = KIND_MODULES[kind]
        try:
            module: Any = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                raise KeyError(kind) from e
            raise
        return module  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[ModelKind]:
        return (kind for kind in KIND_MODULES if kind in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, kind: object) -> bool:
        try:
            self[kind]  # type: ignore[index]
        except KeyError:
            return False
        return True


KINDS: Mapping[ModelKind, KindModule] = _LazyKinds()
"""The kind module of each catalog kind."""
