"""The job document Tier 2 submits, and parsing it with precise errors.

``parse_job`` is the single gate: size limit, schema, kind, and the kind's input, in that order,
each failure raising the error whose ``code`` goes into the job document.
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlx_fusion.errors import InputTooLarge, InvalidInput, JobValidationError, UnknownKind
from mlx_fusion.jobs.inputs import (
    ChatCompletionInput,
    CompletionInput,
    SamplingParams,
    describe_validation_error,
)

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE_CHARS = 1024


class Kind(StrEnum):
    """Job kinds this worker runs."""

    CHAT_COMPLETION = "chat.completion"
    COMPLETION = "completion"


INPUT_MODELS: dict[Kind, type[SamplingParams]] = {
    Kind.CHAT_COMPLETION: ChatCompletionInput,
    Kind.COMPLETION: CompletionInput,
}
"""The input schema of each kind."""


class Priority(StrEnum):
    """Priorities, one RQ queue each."""

    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"


class Status(StrEnum):
    """Job status: ``queued -> processing -> completed | failed | cancelled``."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


def new_job_id() -> str:
    """A fresh job id (32 hex characters)."""
    return uuid.uuid4().hex


def new_request_id() -> str:
    """A fresh correlation id."""
    return f"req_{uuid.uuid4().hex}"


class Webhook(BaseModel):
    """Where to POST the completion event (delivery: see the webhooks module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: AnyHttpUrl


class JobSpec(BaseModel):
    """A job document as Tier 2 submits it (``input`` not yet checked against its kind)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=JOB_ID_PATTERN)] = Field(default_factory=new_job_id)
    kind: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]
    priority: Priority = Priority.DEFAULT
    metadata: dict[Annotated[str, Field(max_length=64)], str] = Field(default_factory=dict)
    request_id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default_factory=new_request_id
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    webhook: Webhook | None = None
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] | None = None

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        for key, item in value.items():
            if len(item) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"value of {key!r} longer than {MAX_METADATA_VALUE_CHARS} chars")
        return value

    def to_document(self) -> dict[str, Any]:
        """The submitted fields as JSON-compatible data (what goes into Redis and MongoDB)."""
        return self.model_dump(mode="json", exclude_none=True)


class Job(BaseModel):
    """A validated job: its document plus its kind-specific input."""

    model_config = ConfigDict(frozen=True)

    spec: JobSpec
    kind: Kind
    input: SamplingParams


def _json_size(raw: Any) -> int:
    try:
        return len(json.dumps(raw, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError) as e:
        raise JobValidationError(f"not JSON-serializable: {e}") from e


def parse_spec(raw: Any, *, max_input_bytes: int) -> JobSpec:
    """Check size and schema of a raw document; raises ``InputTooLarge``/``JobValidationError``."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise JobValidationError(f"job document is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise JobValidationError(f"job document must be a JSON object, got {type(raw).__name__}")
    size = _json_size(raw)
    if size > max_input_bytes:
        raise InputTooLarge(
            f"job document is {size} bytes, the limit is {max_input_bytes}", field="input"
        )
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        field, reason = describe_validation_error(e.errors(), "")
        raise JobValidationError(reason, field=field or None) from e


def parse_job(raw: Any, *, max_input_bytes: int) -> Job:
    """Validate a whole job document: size, schema, kind, then the kind's input."""
    spec = parse_spec(raw, max_input_bytes=max_input_bytes)
    try:
        kind = Kind(spec.kind)
    except ValueError as e:
        known = ", ".join(k.value for k in Kind)
        raise UnknownKind(f"unknown kind {spec.kind!r}; known: {known}", field="kind") from e
    try:
        job_input = INPUT_MODELS[kind].model_validate(spec.input)
    except ValidationError as e:
        field, reason = describe_validation_error(e.errors(), "input")
        raise InvalidInput(reason, field=field) from e
    return Job(spec=spec, kind=kind, input=job_input)
