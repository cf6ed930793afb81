"""The model catalog: a TOML file that is the only way a job names a model.

::

    [models.smollm2-135m]
    kind = "lm"
    path = "models/SmolLM2-135M-Instruct"   # relative to the catalog file
    aliases = ["smollm2"]

Jobs name an id or an alias; a job never makes the worker open a path it supplies.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlx_fusion.errors import CatalogError, ModelNotFound, ModelPathNotAllowed

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9][A-Za-z0-9._:-]*)?$"
_PATHLIKE = re.compile(r"(^[~./\\])|(\.\.)|(\\)|(//)|(^[A-Za-z]:)|(\x00)")


class ModelKind(StrEnum):
    """What a catalog model is; decides which job kinds it can run."""

    LM = "lm"


class ModelSpec(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=MODEL_ID_PATTERN, max_length=256)
    kind: ModelKind
    path: Path
    aliases: tuple[str, ...] = ()
    default_max_tokens: int = Field(default=512, ge=1)


def looks_like_path(name: str) -> bool:
    """True for names a job must not use as a model: absolute, relative or home paths."""
    return bool(_PATHLIKE.search(name))


class Catalog:
    """Catalog entries by id, with alias lookup."""

    def __init__(self, models: Mapping[str, ModelSpec], source: str = "<memory>") -> None:
        self.source = source
        self._models = dict(models)
        self._names: dict[str, str] = {}
        for spec in self._models.values():
            for name in (spec.id, *spec.aliases):
                if name in self._names:
                    raise CatalogError(
                        f"{source}: model {spec.id!r}: name {name!r} is already used by "
                        f"{self._names[name]!r}"
                    )
                self._names[name] = spec.id

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def resolve(self, name: str) -> ModelSpec:
        """The entry a job's ``model`` names; ``ModelNotFound`` / ``ModelPathNotAllowed``."""
        model_id = self._names.get(name)
        if model_id is not None:
            return self._models[model_id]
        if looks_like_path(name):
            raise ModelPathNotAllowed(
                f"model {name!r} looks like a filesystem path; jobs name catalog ids or aliases"
            )
        known = ", ".join(sorted(self._names)) or "(catalog is empty)"
        raise ModelNotFound(f"model {name!r} is not in the catalog; known: {known}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str, base_dir: Path) -> Catalog:
        """Build from parsed TOML; relative paths resolve against ``base_dir``."""
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise CatalogError(f"{source}: 'models' must be a table of model tables")
        unknown = set(data) - {"models"}
        if unknown:
            raise CatalogError(f"{source}: unknown top-level keys: {', '.join(sorted(unknown))}")
        specs: dict[str, ModelSpec] = {}
        for model_id, entry in models.items():
            if not isinstance(entry, dict):
                raise CatalogError(f"{source}: model {model_id!r}: must be a table")
            try:
                spec = ModelSpec.model_validate({"id": model_id, **entry})
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(p) for p in err["loc"]) or "?"
                raise CatalogError(
                    f"{source}: model {model_id!r}: field {field!r}: {err['msg']}"
                ) from e
            if not spec.path.is_absolute():
                spec = spec.model_copy(update={"path": (base_dir / spec.path).resolve()})
            specs[model_id] = spec
        return cls(specs, source=source)

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """Read and check a catalog file; every error names the file, the model and the field."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CatalogError(f"{path}: catalog file not found") from e
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise CatalogError(f"{path}: cannot read catalog: {e}") from e
        return cls.from_dict(data, source=str(path), base_dir=path.parent.resolve())
