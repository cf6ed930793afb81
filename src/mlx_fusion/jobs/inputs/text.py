"""Inputs of ``chat.completion`` and ``completion`` jobs (OpenAI ``/v1/chat/completions`` and
``/v1/completions`` bodies).

Unknown fields are refused rather than silently ignored, so a Tier-2 author learns at once that a
parameter has no effect; ``model`` and ``user`` are accepted and ignored (the job's own ``model``
field names the model).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_TOKENS_LIMIT = 32_768


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingParams(_Strict):
    """Sampling and length controls shared by chat and text completions (OpenAI names)."""

    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = Field(default=1, description="Only one choice per job is supported.")
    stream: Literal[False] = Field(
        default=False, description="Jobs are not streamed; poll the store or use a webhook."
    )
    model: str | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        seqs = [value] if isinstance(value, str) else (value or [])
        if len(seqs) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in seqs):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_sequences(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(_Strict):
    """A text part of a multi-part message content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message; content is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The message's content as plain text."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionInput(SamplingParams):
    """An OpenAI ``/v1/chat/completions`` request body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None

    @model_validator(mode="after")
    def _one_length_limit(self) -> ChatCompletionInput:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def token_limit(self, default: int) -> int:
        """The number of tokens to generate at most."""
        return self.max_completion_tokens or self.max_tokens or default


class CompletionInput(SamplingParams):
    """An OpenAI ``/v1/completions`` request body (one prompt)."""

    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per job")
        return value

    def prompt_text(self) -> str:
        """The prompt as one string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self, default: int) -> int:
        """The number of tokens to generate at most."""
        return self.max_tokens or default
