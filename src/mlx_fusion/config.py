"""Settings: built once at start (``Settings()``) and passed explicitly; nothing reads the
environment at import time. Environment variables carry the ``FUSION_`` prefix; a ``.env`` file in
the working directory is read too."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mlx_fusion import defaults


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "mlx-fusion"


class Settings(BaseSettings):
    """Everything a worker, a client or the CLI needs to know about its surroundings."""

    model_config = SettingsConfigDict(
        env_prefix="FUSION_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis URL; unset means a throwaway local redis-server (single host, dev).",
    )
    mongo_url: str | None = Field(
        default=None,
        description="MongoDB URL; unset means the embedded job store in data_dir (single host, "
        "dev). 'mongomock://' gives an in-process store (tests).",
    )
    mongo_db: str = defaults.MONGO_DB
    data_dir: Path = Field(default_factory=_default_data_dir)
    queue_prefix: str = Field(default=defaults.QUEUE_PREFIX, pattern=r"^[A-Za-z0-9_.:-]+$")
    job_timeout_default_s: int = Field(default=defaults.JOB_TIMEOUT_DEFAULT_S, gt=0)
    job_timeout_max_s: int = Field(default=defaults.JOB_TIMEOUT_MAX_S, gt=0)
    max_input_bytes: int = Field(default=defaults.MAX_INPUT_BYTES, gt=0)
    max_file_bytes: int = Field(
        default=defaults.MAX_FILE_BYTES,
        gt=0,
        description="Largest file a job may reference in the input folder (audio, images).",
    )
    max_result_bytes: int = Field(
        default=defaults.MAX_RESULT_BYTES,
        gt=0,
        description="Results larger than this (as JSON) are stored as blobs, not in the record.",
    )
    catalog_path: Path = Path("models.toml")
    input_dir: Path | None = Field(
        default=None,
        description="The only folder whose files jobs may reference (audio, images); unset: "
        "jobs carry their data inline.",
    )
    retention_days: float = Field(default=defaults.RETENTION_DAYS, gt=0)
    heartbeat_interval_s: float = Field(default=defaults.HEARTBEAT_INTERVAL_S, gt=0)
    result_ttl_s: int = Field(default=defaults.RESULT_TTL_S, gt=0)
    registry_mode: Literal["process", "inprocess"] = Field(
        default="process",
        description="process: each model in its own spawned process (production); inprocess: "
        "models load in the worker process (debugging, tests).",
    )
    memory_budget_bytes: int | None = Field(
        default=None, gt=0, description="Memory for loaded models; unset means a fraction."
    )
    memory_budget_fraction: float = Field(
        default=defaults.MEMORY_BUDGET_FRACTION,
        gt=0,
        le=1,
        description="Fraction of the device's recommended working set (system memory on CPU).",
    )
    max_loaded_models: int = Field(default=defaults.MAX_LOADED_MODELS, ge=1)
    keep_alive_s: float = Field(
        default=defaults.KEEP_ALIVE_S,
        description="Idle time before a model unloads; -1 never, 0 after each job.",
    )
    load_timeout_s: float = Field(default=defaults.LOAD_TIMEOUT_S, gt=0)
    load_cooldown_s: float = Field(default=defaults.LOAD_COOLDOWN_S, ge=0)
    load_cooldown_max_s: float = Field(default=defaults.LOAD_COOLDOWN_MAX_S, ge=0)
    capacity_wait_s: float = Field(
        default=defaults.CAPACITY_WAIT_S,
        ge=0,
        description="How long a job waits for models in use to free memory before no_capacity.",
    )
    allow_cached_hub_models: bool = Field(
        default=False,
        description="Let jobs name hub repo ids that are not in the catalog but are already in "
        "the local Hugging Face cache (nothing is ever downloaded).",
    )
    worker_name: str | None = Field(
        default=None, description="Worker name; unset means host.pid.random (always unique)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.job_timeout_default_s > self.job_timeout_max_s:
            raise ValueError("job_timeout_default_s must not exceed job_timeout_max_s")
        if self.keep_alive_s < 0 and self.keep_alive_s != -1:
            raise ValueError("keep_alive_s must be -1 (never unload) or >= 0")
        return self

    def queue_name(self, priority: str) -> str:
        """The RQ queue a job of this priority goes to."""
        return f"{self.queue_prefix}:{priority}"

    def queue_names(self) -> list[str]:
        """All queues, highest priority first (the order a worker drains them)."""
        return [self.queue_name(p) for p in defaults.PRIORITIES]

    def effective_timeout_s(self, requested_s: float | None) -> int:
        """The finite timeout a job gets: its own if it asks for one, capped at the maximum."""
        if requested_s is None or math.isnan(requested_s) or requested_s <= 0:
            return self.job_timeout_default_s
        if requested_s >= self.job_timeout_max_s:
            return self.job_timeout_max_s
        return max(1, math.ceil(requested_s))
