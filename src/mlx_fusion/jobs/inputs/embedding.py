"""Input of ``embedding`` jobs (the OpenAI ``/v1/embeddings`` body).

``input`` is a string, a list of strings, a list of token ids, or a list of token-id lists; an
error names the offending item the way the other kinds name fields (``input.input.2`` is the
third string, ``input.input.1.0`` the first id of the second list). Unknown fields are refused;
``model`` and ``user`` are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

MAX_EMBEDDING_INPUTS = 2048
"""Most strings (or token-id lists) in one job, as OpenAI allows."""

TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1)]

_SHAPES = ("text", "texts", "tokens", "token_lists")
_SHAPE_ERROR = (
    "must be a non-empty string, a list of strings, a list of token ids or a list of token-id lists"
)


def _shape(value: Any) -> str | None:
    """Which of the four accepted shapes ``value`` claims to be (judged by its first item)."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "token_lists"
    if isinstance(first, int) and not isinstance(first, bool):
        return "tokens"
    return "texts"


EmbeddingInputItems = Annotated[
    Annotated[NonEmptyText, Tag("text")]
    | Annotated[
        list[NonEmptyText], Tag("texts"), Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    ]
    | Annotated[TokenIds, Tag("tokens")]
    | Annotated[
        list[TokenIds], Tag("token_lists"), Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    ],
    Discriminator(_shape, custom_error_type="invalid_shape", custom_error_message=_SHAPE_ERROR),
]


class EmbeddingInput(BaseModel):
    """An OpenAI ``/v1/embeddings`` request body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: EmbeddingInputItems
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    model: str | None = None
    user: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _plain_error_paths(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # errors inside ``input`` carry the union member's tag in their path
        # (``input.texts.2``); the contract's paths name only fields and item indexes
        try:
            return handler(data)
        except ValidationError as e:
            details = [
                InitErrorDetails(
                    type=PydanticCustomError(err["type"], err["msg"]),
                    loc=tuple(p for i, p in enumerate(err["loc"]) if not _is_tag(err["loc"], i)),
                    input=err["input"],
                )
                for err in e.errors()
            ]
            raise ValidationError.from_exception_data(cls.__name__, details) from None

    def texts(self) -> list[str] | None:
        """The inputs as strings, or None when they are token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], str):
            return [str(s) for s in self.input]
        return None

    def token_lists(self) -> list[list[int]] | None:
        """The inputs as token-id lists, or None when they are strings."""
        if isinstance(self.input, str) or isinstance(self.input[0], str):
            return None
        if isinstance(self.input[0], int):
            return [[int(t) for t in self.input]]
        return [[int(t) for t in ids] for ids in self.input]


def _is_tag(loc: tuple[int | str, ...], i: int) -> bool:
    return i == 1 and loc[0] == "input" and loc[1] in _SHAPES
