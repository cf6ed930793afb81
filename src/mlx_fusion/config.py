"""Settings: built once at start (``Settings()``) and passed explicitly; nothing reads the
environment at import time. Environment variables carry the ``FUSION_`` prefix; a ``.env`` file in
the working directory is read too."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mlx_fusion import defaults


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "mlx-fusion"


def _split_list(value: Any) -> Any:
    """A list given as one string (an environment variable): comma or space separated, or JSON."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item for item in re.split(r"[,\s]+", text) if item]
    return value


def _check_secret(secret: SecretStr) -> SecretStr:
    from mlx_fusion.webhooks.signing import secret_key

    secret_key(secret.get_secret_value())
    return secret


class Settings(BaseSettings):
    """Everything a worker, a client or the CLI needs to know about its surroundings."""

    model_config = SettingsConfigDict(
        env_prefix="FUSION_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    redis_url: str | None = Field(
        default=None,
        repr=False,  # it may carry a password
        description="Redis URL; unset means a throwaway local redis-server (single host, dev). "
        "redis://user:password@host:6379/0, rediss:// for TLS, unix:///path for a socket.",
    )
    mongo_url: str | None = Field(
        default=None,
        repr=False,  # it may carry a password
        description="MongoDB URL; unset means the embedded job store in data_dir (single host, "
        "dev). 'mongomock://' gives an in-process store (tests).",
    )
    redis_retry_s: float = Field(
        default=defaults.REDIS_RETRY_S,
        ge=0,
        description="How long a Redis command keeps retrying (a Redis restart) before it fails.",
    )
    mongo_db: str = Field(default=defaults.MONGO_DB, description="MongoDB database name.")
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="The embedded job store, the embedded Redis socket, the demo model and the "
        "spool of results kept while the store is down.",
    )
    queue_prefix: str = Field(
        default=defaults.QUEUE_PREFIX,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Queues are <prefix>:high, :default, :low and :webhooks.",
    )
    job_timeout_default_s: int = Field(
        default=defaults.JOB_TIMEOUT_DEFAULT_S,
        gt=0,
        description="Timeout of a job that names none.",
    )
    job_timeout_max_s: int = Field(
        default=defaults.JOB_TIMEOUT_MAX_S,
        gt=0,
        description="No job runs longer, whatever it asks.",
    )
    max_input_bytes: int = Field(
        default=defaults.MAX_INPUT_BYTES, gt=0, description="Largest job document, as JSON."
    )
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
    catalog_path: Path = Field(default=Path("models.toml"), description="The model catalog.")
    input_dir: Path | None = Field(
        default=None,
        description="The only folder whose files jobs may reference (audio, images); unset: "
        "jobs carry their data inline.",
    )
    retention_days: float = Field(
        default=defaults.RETENTION_DAYS,
        gt=0,
        description="Finished job records (and their blobs) are deleted this long after they end.",
    )
    heartbeat_interval_s: float = Field(
        default=defaults.HEARTBEAT_INTERVAL_S,
        gt=0,
        description="Heartbeat period while a job runs; a job is taken as abandoned after 6 "
        "missed beats.",
    )
    result_ttl_s: int = Field(
        default=defaults.RESULT_TTL_S,
        gt=0,
        description="How long RQ keeps its own small record of a finished job.",
    )
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
    max_loaded_models: int = Field(
        default=defaults.MAX_LOADED_MODELS, ge=1, description="Most models loaded at once."
    )
    keep_alive_s: float = Field(
        default=defaults.KEEP_ALIVE_S,
        description="Idle time before a model unloads; -1 never, 0 after each job.",
    )
    load_timeout_s: float = Field(
        default=defaults.LOAD_TIMEOUT_S,
        gt=0,
        description="A longer model load is killed and counts as a failed load.",
    )
    load_cooldown_s: float = Field(
        default=defaults.LOAD_COOLDOWN_S,
        ge=0,
        description="First wait after a failed load before the model is tried again; doubles "
        "per failure.",
    )
    load_cooldown_max_s: float = Field(
        default=defaults.LOAD_COOLDOWN_MAX_S,
        ge=0,
        description="Longest wait between load attempts of a failing model.",
    )
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
    cancel_grace_s: float = Field(
        default=defaults.CANCEL_GRACE_S,
        ge=0,
        description="A cancelled running job that has not stopped after this long has its model "
        "process killed.",
    )
    job_max_attempts: int = Field(
        default=defaults.JOB_MAX_ATTEMPTS,
        ge=1,
        description="A job whose worker died is run again until it has started this many times; "
        "then it fails with worker_lost.",
    )
    recovery_interval_s: float = Field(
        default=defaults.RECOVERY_INTERVAL_S,
        gt=0,
        description="How often idle GPU workers look for jobs lost by dead workers or by Redis.",
    )
    recovery_grace_s: float = Field(
        default=defaults.RECOVERY_GRACE_S,
        ge=0,
        description="A queued job with no RQ job, or a processing job no worker runs, is taken as "
        "lost once its record is this old.",
    )
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Secrets (whsec_...) that sign every webhook without a named secret; give two "
        "(comma separated) while rotating: each message then carries both signatures.",
    )
    webhook_named_secrets: dict[str, list[SecretStr]] = Field(
        default_factory=dict,
        description='Secrets a job picks by name in webhook.secret, as JSON: {"tier2": '
        '["whsec_..."]} (a list during rotation). Job documents carry only the name.',
    )
    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs, addresses or host names webhooks may reach although they are not "
        "public (comma separated), e.g. 10.0.0.0/8,tier2.internal. Everything else non-public "
        "is refused.",
    )
    webhook_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: list(defaults.WEBHOOK_SCHEDULE_S),
        description="Waits between delivery attempts, in seconds (comma separated); a delivery "
        "gets one attempt more than there are waits.",
    )
    webhook_jitter: float = Field(
        default=defaults.WEBHOOK_JITTER,
        ge=0,
        lt=1,
        description="Each wait between webhook attempts varies by up to this fraction.",
    )
    webhook_timeout_s: float = Field(
        default=defaults.WEBHOOK_TIMEOUT_S,
        gt=0,
        description="Per-phase timeout of a webhook attempt (connect, send, each read); the "
        "attempt is stopped 5 s after it in any case.",
    )
    webhook_max_result_bytes: int = Field(
        default=defaults.WEBHOOK_MAX_RESULT_BYTES,
        ge=0,
        description="Results larger than this go in the webhook as a reference (result_ref).",
    )
    webhook_max_response_bytes: int = Field(
        default=defaults.WEBHOOK_MAX_RESPONSE_BYTES,
        ge=0,
        description="At most this much of a receiver's answer is read.",
    )
    webhook_reconcile_interval_s: float = Field(
        default=defaults.WEBHOOK_RECONCILE_INTERVAL_S,
        gt=0,
        description="How often webhook workers look for deliveries that were never queued.",
    )
    webhook_reconcile_grace_s: float = Field(
        default=defaults.WEBHOOK_RECONCILE_GRACE_S,
        ge=0,
        description="How overdue a pending delivery must be to be taken as lost.",
    )

    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="How many chat, completion or embedding jobs of one model run together in "
        "one batch (continuous batching), unless the catalog entry sets max_batch_size; 1 runs "
        "them one at a time.",
    )
    schedule_lookahead: int = Field(
        default=64,
        ge=0,
        description="How many jobs at the head of a queue the worker looks at to run those of "
        "loaded models first (model-aware scheduling); 0 or 1 is plain FIFO.",
    )
    schedule_max_wait_s: float = Field(
        default=120,
        gt=0,
        description="A job at the head of its queue that has waited this long runs next, "
        "whatever its model (bounds how long model-aware scheduling may pass a job over).",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the worker's HTTP endpoint (/metrics for Prometheus, /healthz); unset "
        "means none. Give each worker on a host its own port (0 picks a free one, logged).",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the metrics endpoint listens on; 0.0.0.0 to let another host scrape.",
    )
    health_max_age_s: float | None = Field(
        default=None,
        gt=0,
        description="A worker whose last heartbeat is older than this is unhealthy (/healthz "
        "answers 503, `mlx-fusion health` exits 1); unset means the worker's own TTL.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="Log lines as JSON (production) or readable console output; auto is console "
        "on a terminal and JSON otherwise. --json-logs forces JSON.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="The lowest level logged."
    )

    _lists = field_validator(
        "webhook_secrets", "webhook_allow", "webhook_schedule_s", mode="before"
    )(_split_list)

    @field_validator("webhook_named_secrets", mode="before")
    @classmethod
    def _named_secret_lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: _split_list(item) for name, item in value.items()}
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _valid_secrets(cls, value: list[SecretStr]) -> list[SecretStr]:
        return [_check_secret(s) for s in value]

    @field_validator("webhook_named_secrets")
    @classmethod
    def _valid_named_secrets(cls, value: dict[str, list[SecretStr]]) -> dict[str, list[SecretStr]]:
        for name, items in value.items():
            if not re.match(defaults.WEBHOOK_SECRET_NAME_PATTERN, name):
                raise ValueError(
                    f"webhook secret name {name!r} must match "
                    f"{defaults.WEBHOOK_SECRET_NAME_PATTERN}"
                )
            if not items:
                raise ValueError(f"webhook secret {name!r} has no secret")
            for s in items:
                _check_secret(s)
        return value

    @field_validator("webhook_schedule_s")
    @classmethod
    def _valid_schedule(cls, value: list[float]) -> list[float]:
        if any(not math.isfinite(v) or v < 0 for v in value):
            raise ValueError("webhook waits must be finite and >= 0")
        return value

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

    def spooled_key(self, job_id: str) -> str:
        """The Redis key marking a job whose final write waits in a worker's spool."""
        return f"{self.queue_prefix}:spooled:{job_id}"

    def cancel_key(self, job_id: str) -> str:
        """The Redis key whose presence cancels the running job ``job_id``."""
        return f"{self.queue_prefix}:cancel:{job_id}"

    def webhook_queue_name(self) -> str:
        """The queue webhook deliveries go to (served by ``mlx-fusion webhook-worker``)."""
        return f"{self.queue_prefix}:{defaults.WEBHOOK_QUEUE_SUFFIX}"

    def webhook_signing_secrets(self, name: str | None) -> list[str]:
        """The secrets that sign a webhook naming secret ``name`` (None: the default ones);
        ``KeyError`` when there are none."""
        found = self.webhook_named_secrets.get(name) if name else self.webhook_secrets
        if not found:
            raise KeyError(name)
        return [s.get_secret_value() for s in found]

    def maintenance_interval_s(self, kind: str) -> int:
        """How often a worker of ``kind`` (gpu or webhook) runs its maintenance (recovery, or
        the webhook reconciler), in whole seconds."""
        interval = self.recovery_interval_s if kind == "gpu" else self.webhook_reconcile_interval_s
        return max(1, math.ceil(interval))

    def worker_ttl_s(self, kind: str) -> int:
        """The RQ worker TTL of a worker of ``kind``: an idle worker wakes every TTL - 15 s for
        maintenance and a heartbeat, so one whose last heartbeat is older than this is dead."""
        return min(defaults.WORKER_TTL_MAX_S, self.maintenance_interval_s(kind) + 15)

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
