"""Input of ``transcription`` jobs: the OpenAI ``/v1/audio/transcriptions`` body, as JSON.

The audio comes inline as ``file`` (base64, or a ``data:audio/...;base64,`` URL) or by reference
as ``file_path``, relative to the worker's input folder (``FUSION_INPUT_DIR``); exactly one of the
two. The worker turns a ``file_path`` into inline data before the model process sees the job.
Unknown fields are refused; ``model`` and ``user`` are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mlx_fusion.jobs.inputs import inline_or_path

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
"""What the result holds (see docs/kinds/transcription.md)."""

TIMESTAMP_GRANULARITIES = ("segment",)
"""The ``timestamp_granularities`` this version produces (word timestamps are not offered)."""


class TranscriptionInput(BaseModel):
    """An OpenAI ``/v1/audio/transcriptions`` request body, with the audio inline or by path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_path: Annotated[str, Field(min_length=1, max_length=4096)] | None = Field(
        default=None, description="A file under the worker's input folder, relative to it."
    )
    file: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        validate_default=True,
        description="The audio as base64, or as a data:<type>;base64,<data> URL.",
    )
    language: Annotated[str, Field(pattern=r"^[a-z]{2,3}$")] | None = Field(
        default=None, description="ISO-639-1 code of the spoken language; detected when absent."
    )
    prompt: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[str] | None = None
    model: str | None = None
    user: str | None = None

    @field_validator("file")
    @classmethod
    def _one_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        return inline_or_path(value, info, name="file", what="audio")

    @field_validator("timestamp_granularities")
    @classmethod
    def _granularities(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if info.data.get("response_format") != "verbose_json":
            raise ValueError("only with response_format 'verbose_json'")
        unsupported = sorted(set(value) - set(TIMESTAMP_GRANULARITIES))
        if unsupported:
            raise ValueError(f"{unsupported} not supported; only 'segment' timestamps are given")
        return value
