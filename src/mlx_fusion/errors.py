"""Every error mlx-fusion reports, each with a stable ``code`` that goes into the job document.

::

    FusionError (internal_error)
    ├── JobValidationError (invalid_job)
    │   ├── UnknownKind (unknown_kind)
    │   ├── InvalidInput (invalid_input)
    │   ├── InputTooLarge (input_too_large)
    │   ├── InputPathNotAllowed (input_path_not_allowed)
    │   ├── FunctionNotAllowed (function_not_allowed)
    │   └── ModelKindMismatch (model_kind_mismatch)
    ├── ModelNotFound (model_not_found)
    │   └── ModelPathNotAllowed (model_path_not_allowed)
    ├── CatalogError (catalog_invalid)
    ├── ModelImportError (model_import_failed)
    ├── ModelLoadError (model_load_failed)
    ├── ModelTooLarge (model_too_large)
    ├── ModelCrashed (model_crashed)
    ├── OutOfMemory (out_of_memory)
    ├── NoCapacity (no_capacity)
    ├── InferenceError (inference_failed)
    │   └── InvalidOutput (invalid_output)
    ├── JobTimeout (timeout)
    ├── WorkerLost (worker_lost)
    ├── JobCancelled (cancelled)
    ├── JobStoreError (store_unavailable)
    ├── IdempotencyConflict (idempotency_conflict)
    ├── StreamTimeout (stream_timeout)
    ├── StreamUnavailable (stream_unavailable)
    ├── WebhookDeliveryError (webhook_failed)
    │   └── WebhookTargetRefused (webhook_target_refused)
    └── WebhookVerificationError (webhook_invalid_signature)
"""

from __future__ import annotations

from typing import Any, ClassVar


class FusionError(Exception):
    """Base of every mlx-fusion error; ``code`` is stable and part of the Tier-2 contract."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` field of a failed job document."""
        return {"code": self.code, "message": self.message}


class JobValidationError(FusionError):
    """The job document does not follow the contract; ``field`` names the offending field."""

    code = "invalid_job"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.field:
            out["field"] = self.field
        return out


class UnknownKind(JobValidationError):
    """The job's ``kind`` is not one this worker runs."""

    code = "unknown_kind"


class InvalidInput(JobValidationError):
    """The job's ``input`` (the OpenAI request body) is invalid for its kind."""

    code = "invalid_input"


class InputTooLarge(JobValidationError):
    """The serialized job document exceeds the configured size limit."""

    code = "input_too_large"


class InputPathNotAllowed(JobValidationError):
    """The job references a file outside the allowed input folder (or none is configured)."""

    code = "input_path_not_allowed"


class FunctionNotAllowed(JobValidationError):
    """The RQ job names a function other than the whitelisted entry point; it was not run."""

    code = "function_not_allowed"


class ModelKindMismatch(JobValidationError):
    """The named model cannot run this kind of job (a chat job on an embedding model)."""

    code = "model_kind_mismatch"


class ModelNotFound(FusionError):
    """The job names a model that is neither a catalog id nor an alias."""

    code = "model_not_found"


class ModelPathNotAllowed(ModelNotFound):
    """The job names a filesystem path as its model; jobs may only name catalog entries."""

    code = "model_path_not_allowed"


class CatalogError(FusionError):
    """The model catalog file is invalid; the message names file, model id and field."""

    code = "catalog_invalid"


class ModelImportError(FusionError):
    """A file or directory could not be imported as an MLX model (truncated, foreign format)."""

    code = "model_import_failed"


class ModelLoadError(FusionError):
    """A catalog model could not be loaded (missing or corrupt files)."""

    code = "model_load_failed"


class ModelTooLarge(FusionError):
    """The model cannot fit in the memory budget even with every other model unloaded."""

    code = "model_too_large"


class ModelCrashed(FusionError):
    """The model's process died (a segfault, an out-of-memory abort, a kill) during the job."""

    code = "model_crashed"


class OutOfMemory(FusionError):
    """The device ran out of memory during a load or a job, even after evicting idle models."""

    code = "out_of_memory"


class NoCapacity(FusionError):
    """No room could be made in time: the models holding the memory are all in use."""

    code = "no_capacity"


class InferenceError(FusionError):
    """The model raised while running the job."""

    code = "inference_failed"


class InvalidOutput(InferenceError):
    """The model's output breaks the job's constraints: a tool call that does not parse, JSON
    that does not match ``response_format``."""

    code = "invalid_output"


class JobTimeout(FusionError):
    """The job ran past its timeout and was stopped."""

    code = "timeout"


class JobCancelled(FusionError):
    """Tier 2 cancelled the job while it ran; the job ends ``cancelled``, not failed."""

    code = "cancelled"


class WorkerLost(FusionError):
    """The job's worker died (killed, power loss, lost its Redis) on the job's last allowed
    attempt."""

    code = "worker_lost"


class JobStoreError(FusionError):
    """The job store (MongoDB) could not be reached or refused a write."""

    code = "store_unavailable"


class IdempotencyConflict(FusionError):
    """A submit reuses an ``idempotency_key`` with a different job body; nothing was stored."""

    code = "idempotency_conflict"


class StreamTimeout(FusionError):
    """(Stream reader) no entry of the job's token stream arrived within the reader's timeout."""

    code = "stream_timeout"


class StreamUnavailable(FusionError):
    """(Stream reader) the job has no complete token stream to read: it was not submitted with
    ``stream: true``, its stream expired or was trimmed past the reader, or the job ended (or ran
    again) without finishing it. The job record holds the result."""

    code = "stream_unavailable"


class WebhookDeliveryError(FusionError):
    """A completion webhook could not be delivered."""

    code = "webhook_failed"


class WebhookTargetRefused(WebhookDeliveryError):
    """The webhook URL is not http(s), or its host resolves to an address that is not public and
    not admitted by the allow-list. Retrying cannot help."""

    code = "webhook_target_refused"


class WebhookVerificationError(FusionError):
    """(Receiver side) a webhook failed verification: missing headers, a timestamp outside the
    tolerance, or no signature that matches a known secret."""

    code = "webhook_invalid_signature"


def _subclasses(cls: type[FusionError]) -> list[type[FusionError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def error_from_dict(data: dict[str, Any]) -> FusionError:
    """Rebuild an error sent across a process boundary as ``{code, message}``."""
    by_code = {c.code: c for c in reversed(_subclasses(FusionError))}
    cls = by_code.get(str(data.get("code")), FusionError)
    message = str(data.get("message", ""))
    if issubclass(cls, JobValidationError):
        err: FusionError = cls(message)
        err.field = data.get("field")  # type: ignore[attr-defined]
        return err
    return cls(message)


def error_dict(exc: BaseException) -> dict[str, Any]:
    """The ``error`` field for any exception (``internal_error`` unless it is one of ours)."""
    if isinstance(exc, FusionError):
        return exc.to_dict()
    return {"code": FusionError.code, "message": f"{type(exc).__name__}: {exc}"}
