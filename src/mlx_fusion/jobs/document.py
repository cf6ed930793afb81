"""The job document Tier 2 submits, and parsing it with precise errors.

``parse_job`` is the single gate: size limit, schema, kind, and the kind's input, in that order,
each failure raising the error whose ``code`` goes into the job document.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlx_fusion import defaults
from mlx_fusion.errors import InputTooLarge, InvalidInput, JobValidationError, UnknownKind
from mlx_fusion.jobs.inputs import describe_validation_error

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE_CHARS = 1024
MAX_DEPTH = 64
"""Deepest nesting of objects and arrays a job document may have."""


class Kind(StrEnum):
    """Job kinds: each takes the OpenAI request body of its endpoint as ``input``."""

    CHAT_COMPLETION = "chat.completion"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"
    IMAGE_GENERATION = "image.generation"
    IMAGE_EDIT = "image.edit"


INPUT_MODELS: dict[Kind, str] = {
    Kind.CHAT_COMPLETION: "mlx_fusion.jobs.inputs.text:ChatCompletionInput",
    Kind.COMPLETION: "mlx_fusion.jobs.inputs.text:CompletionInput",
    Kind.EMBEDDING: "mlx_fusion.jobs.inputs.embedding:EmbeddingInput",
    Kind.TRANSCRIPTION: "mlx_fusion.jobs.inputs.audio:TranscriptionInput",
    Kind.IMAGE_GENERATION: "mlx_fusion.jobs.inputs.image:ImageGenerationInput",
    Kind.IMAGE_EDIT: "mlx_fusion.jobs.inputs.image:ImageEditInput",
}
"""The input schema of each kind, as ``module:Class`` (imported when first needed)."""


def input_model(kind: Kind) -> type[BaseModel] | None:
    """The input schema of ``kind``, or None when this version does not run that kind."""
    module_name, _, attr = INPUT_MODELS[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise
    model: type[BaseModel] = getattr(module, attr)
    return model


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
    """Where to POST the completion event, and which configured secret signs it (by name; the
    secret itself never travels in a job). Delivery: see the webhooks module."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: Annotated[AnyHttpUrl, Field(max_length=2048)]
    secret: Annotated[str, Field(pattern=defaults.WEBHOOK_SECRET_NAME_PATTERN)] | None = None


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

    def body_hash(self) -> str:
        """What an idempotency key promises stays the same: a hash of every field but ``id``,
        ``request_id`` and the key itself (SHA-256 of canonical JSON)."""
        body = self.model_dump(mode="json", exclude={"id", "request_id", "idempotency_key"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


class Job(BaseModel):
    """A validated job: its document plus its kind-specific input."""

    model_config = ConfigDict(frozen=True)

    spec: JobSpec
    kind: Kind
    input: BaseModel


def _depth(raw: Any, limit: int) -> int:
    """How deeply containers nest in ``raw``, counted without recursion and up to ``limit + 1``
    (a hostile document may nest deeper than Python can recurse)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(raw, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth) for item in items)
    return deepest


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
        except (ValueError, RecursionError) as e:
            raise JobValidationError(f"job document is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise JobValidationError(f"job document must be a JSON object, got {type(raw).__name__}")
    if _depth(raw, MAX_DEPTH) > MAX_DEPTH:
        raise JobValidationError(f"job document nests deeper than {MAX_DEPTH} levels")
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
    schema = input_model(Kind(spec.kind)) if spec.kind in Kind._value2member_map_ else None
    if schema is None:
        known = ", ".join(k.value for k in Kind if input_model(k) is not None)
        raise UnknownKind(f"unknown kind {spec.kind!r}; known: {known}", field="kind")
    kind = Kind(spec.kind)
    try:
        job_input = schema.model_validate(spec.input)
    except ValidationError as e:
        field, reason = describe_validation_error(e.errors(), "input")
        raise InvalidInput(reason, field=field) from e
    return Job(spec=spec, kind=kind, input=job_input)


_ECHOED_FIELDS = ("kind", "model", "request_id", "priority")
_ECHO_MAX_CHARS = 256


def safe_fields(raw: Any) -> dict[str, str]:
    """The few plain string fields of a document, valid or not, worth keeping in its failed
    record and its log lines (short strings only)."""
    if not isinstance(raw, Mapping):
        return {}
    return {
        k: v
        for k in _ECHOED_FIELDS
        if isinstance(v := raw.get(k), str) and 0 < len(v) <= _ECHO_MAX_CHARS
    }
