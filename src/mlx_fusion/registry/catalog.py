"""The model catalog: a TOML file that is the only way a job names a model.

::

    [models.smollm2-135m]
    kind = "lm"
    path = "models/SmolLM2-135M-Instruct"   # relative to the catalog file
    aliases = ["smollm2"]
    pinned = false              # load at worker start, never evict
    keep_alive_s = 600          # idle time before unloading; -1 never, 0 after each job
    max_concurrent_jobs = 1
    max_batch_size = 32         # chat/completion/embedding jobs batched together (default:
                                # FUSION_MAX_BATCH_SIZE); 1 runs them one at a time
    prompt_cache_bytes = 536870912   # reusable KV caches of prompt prefixes (lm); 0 turns off

    [models.qwen]
    kind = "lm"
    hub = "mlx-community/Qwen3-0.6B-4bit"   # resolved only from the local Hugging Face cache

Jobs name an id or an alias; a job never makes the worker open a path it supplies.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlx_fusion.errors import CatalogError, ModelNotFound, ModelPathNotAllowed

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9][A-Za-z0-9._:-]*)?$"
_PATHLIKE = re.compile(r"(^[~./\\])|(\.\.)|(\\)|(//)|(^[A-Za-z]:)|(\x00)")


class ModelKind(StrEnum):
    """What a catalog model is; decides which job kinds it can run."""

    LM = "lm"
    VLM = "vlm"
    EMBEDDINGS = "embeddings"
    WHISPER = "whisper"
    IMAGE_GENERATION = "image-generation"
    IMAGE_EDIT = "image-edit"


class ModelSpec(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=MODEL_ID_PATTERN, max_length=256)
    kind: ModelKind
    path: Path | None = None
    hub: str | None = Field(default=None, pattern=MODEL_ID_PATTERN)
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    keep_alive_s: float | None = None
    max_concurrent_jobs: int = Field(default=1, ge=1)
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Jobs run together in one batch, for kinds that batch (lm, embeddings); None: the
    worker's ``max_batch_size`` setting."""
    prompt_cache_bytes: int | None = Field(default=None, ge=0)
    """Bytes of KV caches kept for prompt-prefix reuse (lm, batched); None: 512 MiB, 0: off."""
    default_max_tokens: int = Field(default=512, ge=1)
    quantize_bits: Literal[2, 3, 4, 6, 8] | None = None
    trust_remote_code: bool = False
    adapter_path: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.path is None and self.hub is None:
            raise ValueError("give exactly one of 'path' or 'hub'")
        if self.keep_alive_s is not None and self.keep_alive_s < 0 and self.keep_alive_s != -1:
            raise ValueError("keep_alive_s must be -1 (never unload) or >= 0")
        return self

    @property
    def model_dir(self) -> Path:
        """The directory to load (catalog paths are resolved and checked at catalog load)."""
        assert self.path is not None, "hub entries are resolved to a path by the catalog"
        return self.path


def cached_hub_dir(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id``, never downloading; None if absent."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub missing: the same answer for a job
        return None


def looks_like_path(name: str) -> bool:
    """True for names a job must not use as a model: absolute, relative or home paths."""
    return bool(_PATHLIKE.search(name))


class Catalog:
    """Catalog entries by id, with alias lookup."""

    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        source: str = "<memory>",
        *,
        allow_cached_hub_models: bool = False,
    ) -> None:
        self.source = source
        self.allow_cached_hub_models = allow_cached_hub_models
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
        if self.allow_cached_hub_models and re.fullmatch(MODEL_ID_PATTERN, name) and "/" in name:
            cached = cached_hub_dir(name)
            if cached is not None:
                return ModelSpec(id=name, kind=ModelKind.LM, path=cached)
        known = ", ".join(sorted(self._names)) or "(catalog is empty)"
        raise ModelNotFound(f"model {name!r} is not in the catalog; known: {known}")

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str,
        base_dir: Path,
        allow_cached_hub_models: bool = False,
    ) -> Catalog:
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
            if "path" in entry and "hub" in entry:
                raise CatalogError(
                    f"{source}: model {model_id!r}: give exactly one of 'path' or 'hub'"
                )
            try:
                spec = ModelSpec.model_validate({"id": model_id, **entry})
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(p) for p in err["loc"])
                where = f"field {field!r}: " if field else ""
                raise CatalogError(f"{source}: model {model_id!r}: {where}{err['msg']}") from e
            specs[model_id] = _located(spec, source, base_dir)
        return cls(specs, source=source, allow_cached_hub_models=allow_cached_hub_models)

    @classmethod
    def load(cls, path: Path, *, allow_cached_hub_models: bool = False) -> Catalog:
        """Read and check a catalog file; every error names the file, the model and the field."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CatalogError(f"{path}: catalog file not found") from e
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise CatalogError(f"{path}: cannot read catalog: {e}") from e
        return cls.from_dict(
            data,
            source=str(path),
            base_dir=path.parent.resolve(),
            allow_cached_hub_models=allow_cached_hub_models,
        )


def _located(spec: ModelSpec, source: str, base_dir: Path) -> ModelSpec:
    """The entry with its paths absolute and checked to exist (hub ids resolved from the cache)."""
    where = f"{source}: model {spec.id!r}"
    if spec.hub is not None:
        cached = cached_hub_dir(spec.hub)
        if cached is None:
            raise CatalogError(
                f"{where}: field 'hub': {spec.hub!r} is not in the local Hugging Face cache "
                "(nothing is downloaded)"
            )
        path = cached
    else:
        assert spec.path is not None
        path = spec.path if spec.path.is_absolute() else (base_dir / spec.path).resolve()
        if not path.exists():
            raise CatalogError(f"{where}: field 'path': {path} does not exist")
    adapter = spec.adapter_path
    if adapter is not None:
        adapter = adapter if adapter.is_absolute() else (base_dir / adapter).resolve()
        if not adapter.exists():
            raise CatalogError(f"{where}: field 'adapter_path': {adapter} does not exist")
    return spec.model_copy(update={"path": path, "adapter_path": adapter})
