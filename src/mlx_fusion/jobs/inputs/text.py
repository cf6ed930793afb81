"""Inputs of ``chat.completion`` and ``completion`` jobs (OpenAI ``/v1/chat/completions`` and
``/v1/completions`` bodies).

Unknown fields are refused rather than silently ignored, so a Tier-2 author learns at once that a
parameter has no effect; ``model`` and ``user`` are accepted and ignored (the job's own ``model``
field names the model). Chat inputs also take OpenAI ``tools`` / ``tool_choice`` (with assistant
``tool_calls`` and ``tool`` messages in the history), ``response_format`` (``text``,
``json_object`` or ``json_schema``) and ``logprobs`` / ``top_logprobs``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 16
MAX_TOKENS_LIMIT = 32_768
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TOOL_CHOICE_MODES = ("none", "auto", "required")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(_Strict):
    """OpenAI ``stream_options`` of a streamed job."""

    include_usage: bool = Field(
        default=False,
        description="End the stream with one more chunk: empty choices and the job's usage "
        "(every other chunk then carries usage: null).",
    )


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
    stream: bool = Field(
        default=False,
        description="Also publish the tokens as they are produced, as OpenAI stream chunks, to "
        "the job's Redis stream PREFIX:stream:ID (bounded, expiring); read it with "
        "Client.stream or XREAD (docs/contract.md#streaming). The record still gets the result.",
    )
    stream_options: StreamOptions | None = Field(
        default=None, description="Only with stream: true (OpenAI stream_options)."
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

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is not True:
            raise ValueError("only allowed when stream is true")
        return value

    def include_usage(self) -> bool:
        """Whether a streamed job ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def stop_sequences(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(_Strict):
    """A text part of a multi-part message content."""

    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    """Where an image part's image is: a ``data:image/...;base64,`` URL, or ``file:<path>`` naming
    a file under the worker's input folder (read by the worker, never by the model process).
    ``http(s)`` URLs are refused: remote images are not fetched. The URL is checked by the kind
    that runs the job (``vlm``'s ``prepare``), so its error names the exact part."""

    url: Annotated[str, Field(min_length=1)]
    detail: Literal["auto", "low", "high"] = "auto"

    def file_ref(self) -> str | None:
        """The path of a ``file:`` reference (``file:a.png``, ``file:///abs/a.png``), else None."""
        if not self.url.lower().startswith("file:"):
            return None
        ref = self.url[len("file:") :]
        return ref[2:] if ref.startswith("//") else ref


class ImagePart(_Strict):
    """An image part of a multi-part message content (OpenAI ``image_url``); only models of
    catalog kind ``vlm`` take them."""

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
"""One part of a multi-part message content."""


class FunctionCall(_Strict):
    """The function an assistant message called: its name and its arguments as a JSON string."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise ValueError(f"must be a JSON object encoded as a string: {e}") from e
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object encoded as a string")
        return value

    def arguments_object(self) -> dict[str, Any]:
        """The arguments decoded (chat templates render them as an object)."""
        parsed: dict[str, Any] = json.loads(self.arguments)
        return parsed


class ToolCall(_Strict):
    """One tool call of an earlier assistant message."""

    id: Annotated[str, Field(min_length=1, max_length=128)]
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    """One chat message; content is a string or a list of text and image parts.

    An ``assistant`` message may carry ``tool_calls`` (and then omit ``content``); a ``tool``
    message answers one of them and must name it in ``tool_call_id``.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    tool_call_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @model_validator(mode="after")
    def _fields_of_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages carry them, not {self.role!r}")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: required on a 'tool' message")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id: only 'tool' messages carry one, not {self.role!r}")
        if self.content is None and self.tool_calls is None:
            raise ValueError(
                "content: required (only an assistant message with tool_calls omits it)"
            )
        return self

    def text(self) -> str:
        """The message's content as plain text ("" when it has none)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def images(self) -> list[tuple[int, ImagePart]]:
        """The image parts of the content with their indexes in it."""
        if not isinstance(self.content, list):
            return []
        return [(i, part) for i, part in enumerate(self.content) if isinstance(part, ImagePart)]

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (``developer`` shown as ``system``,
        tool-call arguments as objects)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": call.function.arguments_object(),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Strict):
    """A function the model may call; ``parameters`` is its JSON Schema (given to the template)."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    """An OpenAI tool: only ``function`` tools exist."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    """The function a named ``tool_choice`` forces."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]


class NamedToolChoice(_Strict):
    """``{"type": "function", "function": {"name": ...}}``: the model must call this tool."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    """The ``json_schema`` of a ``response_format``: the output must validate against ``schema``.
    Which JSON Schema keywords a model supports is up to its kind (checked before the job runs)."""

    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def top_level_type(self) -> str | None:
        """``object`` or ``array`` when the schema fixes the top-level value to one of them."""
        kind = (self.schema_ or {}).get("type")
        return kind if kind in ("object", "array") else None


class ResponseFormat(_Strict):
    """OpenAI ``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: required when type is 'json_schema', and only then")
        return self


class ChatCompletionInput(SamplingParams):
    """An OpenAI ``/v1/chat/completions`` request body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("messages")
    @classmethod
    def _tool_results_answer_calls(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        called: set[str] = set()
        for i, message in enumerate(value):
            called.update(call.id for call in message.tool_calls or ())
            if message.tool_call_id is not None and message.tool_call_id not in called:
                raise ValueError(
                    f"messages[{i}].tool_call_id {message.tool_call_id!r} answers no tool call "
                    "of an earlier assistant message"
                )
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in value or ()]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"function names must be unique; repeated: {', '.join(dupes)}")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        expected = "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
        if value is None or isinstance(value, NamedToolChoice):
            return value
        if isinstance(value, str):
            if value not in TOOL_CHOICE_MODES:
                raise ValueError(f"must be {expected}, got {value!r}")
            return value
        if isinstance(value, dict):
            try:
                return NamedToolChoice.model_validate(value)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from e
        raise ValueError(f"must be {expected}")

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(
        cls, value: str | NamedToolChoice | None, info: ValidationInfo
    ) -> str | NamedToolChoice | None:
        if value is None:
            return value
        if "tools" not in info.data:
            raise ValueError("tools is invalid")
        tools: list[Tool] | None = info.data["tools"]
        if not tools:
            raise ValueError("only allowed when tools are given")
        if isinstance(value, NamedToolChoice):
            names = [tool.function.name for tool in tools]
            if value.function.name not in names:
                raise ValueError(
                    f"names function {value.function.name!r}, which is not among the tools "
                    f"({', '.join(names)})"
                )
        return value

    @field_validator("response_format")
    @classmethod
    def _json_without_tools(
        cls, value: ResponseFormat | None, info: ValidationInfo
    ) -> ResponseFormat | None:
        if value is None or value.type == "text":
            return value
        if info.data.get("tools") and info.data.get("tool_choice") != "none":
            raise ValueError(
                f"{value.type} cannot be combined with tools (unless tool_choice is 'none')"
            )
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("requires logprobs: true")
        return value

    @model_validator(mode="after")
    def _one_length_limit(self) -> ChatCompletionInput:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def token_limit(self, default: int) -> int:
        """The number of tokens to generate at most."""
        return self.max_completion_tokens or self.max_tokens or default

    def active_tools(self) -> list[Tool]:
        """The tools the model is shown: none when ``tool_choice`` is ``none``, only the named
        one when ``tool_choice`` names a function, else all of them."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            return [tool for tool in self.tools if tool.function.name == name]
        return list(self.tools)

    def tool_call_required(self) -> bool:
        """Whether the answer must be a tool call (``required`` or a named function)."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def json_mode(self) -> str | None:
        """``json_object`` or ``json_schema`` when the output must be JSON, else None."""
        fmt = self.response_format
        return None if fmt is None or fmt.type == "text" else fmt.type


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
