"""The model registry: resolves a job's model through the catalog and leases a loaded model.

``ModelRegistry`` (in ``lru``) keeps each loaded model in its own spawned process (or in this
process, for debugging) within a count limit and a memory budget.
"""

from mlx_fusion.registry.catalog import Catalog, ModelKind, ModelSpec
from mlx_fusion.registry.lru import Lease, ModelRegistry

__all__ = ["Catalog", "Lease", "ModelKind", "ModelRegistry", "ModelSpec"]
