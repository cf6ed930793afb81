"""Tool calls and reasoning in a chat model's output, through mlx-lm's own machinery.

mlx-lm's tokenizer wrapper knows a model's tool-call format (``tool_call_start`` /
``tool_call_end`` and a ``tool_parser`` from ``mlx_lm.tool_parsers``, inferred from the chat
template or vocabulary) and its thinking markers (``think_start`` / ``think_end``).
``split_output`` cuts the generated text into content, reasoning and tool-call texts with
mlx-lm's ``TextStateMachine`` (the markers are stripped), and ``openai_tool_calls`` turns the
tool-call texts into OpenAI ``tool_calls``. ``ForcedPrefix`` makes a model start its answer with
the tool-call marker, for ``tool_choice`` ``required`` or a named function.
"""

from __future__ import annotations

import importlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from mlx_fusion.errors import FusionError, InvalidInput, InvalidOutput
from mlx_fusion.jobs.inputs.text import Tool


def output_error(message: str) -> FusionError:
    """The error of a job whose output breaks its constraints (a tool call that does not parse,
    JSON that does not validate)."""
    return InvalidOutput(message)


def require_tool_support(model_id: str, tokenizer: Any) -> None:
    """Raise ``invalid_input`` (field ``input.tools``) when mlx-lm knows no tool-call format for
    this model, so its tool calls could not be recognised."""
    if not getattr(tokenizer, "has_tool_calling", False) or tokenizer.tool_parser is None:
        raise InvalidInput(
            f"model {model_id!r} does not support tool calling: mlx-lm recognises no tool-call "
            "format in its chat template or vocabulary; send the job without tools "
            "(or with tool_choice 'none')",
            field="input.tools",
        )


def tool_payload(tools: list[Tool]) -> list[dict[str, Any]]:
    """Tools as chat templates and tool parsers take them (OpenAI shape, no null fields)."""
    return [tool.model_dump(exclude_none=True) for tool in tools]


@dataclass(frozen=True)
class ForcedPrefix:
    """A logits processor that makes the first generated tokens be exactly ``tokens``."""

    tokens: tuple[int, ...]
    prompt_tokens: int

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        step = tokens.size - self.prompt_tokens
        if step >= len(self.tokens):
            return logits
        keep = mx.arange(logits.shape[-1]) == self.tokens[step]
        return mx.where(keep, logits, mx.array(-mx.inf, dtype=logits.dtype))


def initial_state(tokenizer: Any, prompt: list[int]) -> str:
    """``reasoning`` when the prompt leaves a thinking block open (the template opened it for the
    model), else ``normal`` (or the state a custom chat-template module names)."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(
        prompt
    ):
        state = "reasoning"
    return str(tokenizer.response_initial_state or state)


@dataclass(frozen=True)
class SplitOutput:
    """Generated text cut by state: the answer, the reasoning and the raw tool-call texts."""

    content: str
    reasoning: str | None
    tool_texts: list[str]
    open_tool_call: bool
    """The text ended inside a tool call (cut by max_tokens or a stop sequence)."""


def _mlx_generate() -> Any:
    return importlib.import_module("mlx_lm.generate")


def _state_machine(tokenizer: Any, with_tools: bool) -> Any:
    if with_tools:
        return _mlx_generate().make_text_state_machine(tokenizer)
    transitions: dict[str, list[tuple[str, str]]] = {}
    if tokenizer.has_thinking:
        transitions["normal"] = [(tokenizer.think_start, "reasoning")]
        transitions["reasoning"] = [(tokenizer.think_end, "normal")]
    return _mlx_generate().TextStateMachine(transitions or None)


def split_output(tokenizer: Any, text: str, initial: str, with_tools: bool) -> SplitOutput:
    """Split ``text`` into content, reasoning and (when ``with_tools``) tool-call texts."""
    machine = _state_machine(tokenizer, with_tools)
    state, segments = machine.split(machine.make_state(initial), text)
    _, rest, current = machine.flush(state)
    segments.append((current, rest))
    content: list[str] = []
    reasoning: list[str] = []
    tool_texts: list[str] = []
    pending: list[str] | None = None
    for name, piece in segments:
        if name == "tool":
            pending = (pending or []) + [piece]
            continue
        if pending is not None:
            tool_texts.append("".join(pending))
            pending = None
        (reasoning if name == "reasoning" else content).append(piece)
    if pending is not None:
        tool_texts.append("".join(pending))
    answer = "".join(content)
    return SplitOutput(
        # markers found: the text around them is layout ("\n\n" after </think>), not answer
        content=answer.strip() if reasoning or tool_texts else answer,
        reasoning="".join(reasoning).strip() or None,
        tool_texts=tool_texts,
        open_tool_call=pending is not None,
    )


def _openai_call(item: Any, names: set[str]) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise output_error(f"the model's tool call has no function name: {item!r}")
    name = item["name"]
    if name not in names:
        raise output_error(
            f"the model called {name!r}, which is not among the offered tools "
            f"({', '.join(sorted(names))})"
        )
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise output_error(f"the arguments of the model's call to {name!r} are not JSON") from e
    if not isinstance(arguments, dict):
        raise output_error(f"the arguments of the model's call to {name!r} are not an object")
    call_id = item.get("id")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def openai_tool_calls(
    tokenizer: Any, split: SplitOutput, tools: list[Tool], finish_reason: str
) -> list[dict[str, Any]]:
    """The OpenAI ``tool_calls`` of the split output; a call that does not parse, or that names
    a function not offered, fails the job (it is never left in ``content``)."""
    payload = tool_payload(tools)
    names = {tool.function.name for tool in tools}
    calls: list[dict[str, Any]] = []
    for i, text in enumerate(split.tool_texts):
        try:
            parsed = tokenizer.tool_parser(text, payload)
        except Exception as e:
            cut = split.open_tool_call and i == len(split.tool_texts) - 1
            why = f" (the output ended inside it: finish_reason {finish_reason!r})" if cut else ""
            raise output_error(
                f"the model's tool call could not be parsed{why}: {type(e).__name__}: {e}; "
                f"text: {text[:200]!r}"
            ) from e
        for item in parsed if isinstance(parsed, list) else [parsed]:
            calls.append(_openai_call(item, names))
    return calls
