"""Language models through mlx-lm: chat and text completions, OpenAI-shaped results.

Exports the names every kind module has: ``JOB_KINDS``, ``load(spec)``, ``prepare(job,
settings)`` and ``run(model, job)``. Chat jobs may offer tools (parsed with mlx-lm's tool parsers:
``lm_tools``), constrain the answer to JSON (``lm_json``, checked against a schema subset:
``lm_schema``) and ask for log-probabilities; reasoning blocks go to ``reasoning_content``.
MLX is imported inside the functions, so importing this module does not initialise it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

from mlx_fusion.errors import InvalidInput, ModelLoadError
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.inputs import ChatCompletionInput, CompletionInput, SamplingParams
from mlx_fusion.jobs.inputs.text import Tool
from mlx_fusion.registry import cancel
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.kinds.lm_json import JsonLogitsProcessor, JsonTokenIndex, TokenVocab
from mlx_fusion.registry.kinds.lm_schema import SchemaError, check_schema, schema_violation
from mlx_fusion.registry.kinds.lm_tools import (
    ForcedPrefix,
    initial_state,
    openai_tool_calls,
    output_error,
    require_tool_support,
    split_output,
    tool_payload,
)

if TYPE_CHECKING:
    from mlx_fusion.config import Settings

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})
"""The job kinds a language model runs."""


@dataclass(frozen=True)
class LoadedLM:
    """A loaded mlx-lm model with its tokenizer (token tables built on first use)."""

    spec: ModelSpec
    model: Any
    tokenizer: Any

    @cached_property
    def vocab(self) -> TokenVocab:
        """The bytes of every token."""
        return TokenVocab.build(self.tokenizer)

    @cached_property
    def json_index(self) -> JsonTokenIndex:
        """The tables of JSON-constrained decoding."""
        return JsonTokenIndex(self.vocab)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Generation:
    """What one generation produced."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    inference_ms: float
    tokens_per_s: float
    stop_sequence: str | None = None
    """The stop sequence that ended the text, if one did."""
    logprobs: list[TokenLogprob] | None = None
    """Per token of ``text``, when asked for."""

    def metrics(self) -> dict[str, Any]:
        """The job metrics of this generation."""
        return {
            "inference_ms": self.inference_ms,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass(frozen=True)
class ChatPlan:
    """How a chat job runs: its prompt, the tools shown, and what constrains the output."""

    prompt: list[int]
    tools: list[Tool] = field(default_factory=list)
    initial_state: str = "normal"


def load(spec: ModelSpec) -> LoadedLM:
    """Load the model directory named by the catalog entry, with its load options."""
    path = spec.model_dir
    if not path.is_dir():
        raise ModelLoadError(f"model {spec.id!r}: directory {path} does not exist")
    try:
        import mlx_lm

        loaded: Any = mlx_lm.load(
            str(path),
            adapter_path=str(spec.adapter_path) if spec.adapter_path else None,
            trust_remote_code=spec.trust_remote_code,
        )
        model, tokenizer = loaded[0], loaded[1]
        if spec.quantize_bits is not None:
            import mlx.core as mx
            import mlx.nn as nn

            nn.quantize(model, bits=spec.quantize_bits)  # type: ignore[attr-defined]
            mx.eval(model.parameters())
    except Exception as e:
        raise ModelLoadError(f"model {spec.id!r}: {type(e).__name__}: {e}") from e
    return LoadedLM(spec=spec, model=model, tokenizer=tokenizer)


def _check_schema(job_input: Any) -> None:
    fmt = getattr(job_input, "response_format", None)
    if fmt is None or fmt.json_schema is None or fmt.json_schema.schema_ is None:
        return
    try:
        check_schema(fmt.json_schema.schema_)
    except SchemaError as e:
        raise InvalidInput(e.reason, field=f"input.response_format.json_schema.{e.path}") from e


def prepare(job: Job, settings: Settings) -> Job:
    """Refuse, before the job runs, a ``json_schema`` using keywords this kind cannot check, and
    image parts (a text-only model cannot see them)."""
    _check_schema(job.input)
    if isinstance(job.input, ChatCompletionInput):
        for n, message in enumerate(job.input.messages):
            for m, _ in message.images()[:1]:
                raise InvalidInput(
                    "this model is text-only (catalog kind lm); send images to a vlm model",
                    field=f"input.messages.{n}.content.{m}",
                )
    return job


def _render_chat(lm: LoadedLM, job_input: ChatCompletionInput) -> ChatPlan:
    tokenizer = lm.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidInput(
            f"model {lm.spec.id!r} has no chat template; use kind 'completion'", field="kind"
        )
    tools = job_input.active_tools()
    kwargs: dict[str, Any] = {}
    if tools:
        require_tool_support(lm.spec.id, tokenizer)
        kwargs["tools"] = tool_payload(tools)
    if job_input.json_mode() or job_input.tool_call_required():
        kwargs["enable_thinking"] = False  # the constraint starts at the first token
    messages = [m.template_dict() for m in job_input.messages]
    try:
        tokens: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as e:
        raise InvalidInput(
            f"the chat template of model {lm.spec.id!r} refused the messages: "
            f"{type(e).__name__}: {e}",
            field="input.messages",
        ) from e
    if isinstance(tokens, Mapping):
        tokens = tokens["input_ids"]
    prompt = [int(t) for t in tokens]
    return ChatPlan(prompt=prompt, tools=tools, initial_state=initial_state(tokenizer, prompt))


def _constraints(lm: LoadedLM, job_input: ChatCompletionInput, plan: ChatPlan) -> list[Any]:
    fmt = job_input.response_format
    if fmt is not None and fmt.type != "text":
        top = "object" if fmt.json_schema is None else (fmt.json_schema.top_level_type() or "any")
        return [JsonLogitsProcessor(lm.json_index, len(plan.prompt), top)]
    start = lm.tokenizer.tool_call_start_tokens
    if plan.tools and job_input.tool_call_required() and start:
        return [ForcedPrefix(tuple(start), len(plan.prompt))]
    return []


def earliest_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str | None]:
    """(index, sequence) of the first stop sequence in ``text`` at or after ``search_from``, or
    (-1, None); callers search only the tail a new segment can have completed."""
    hits = [(i, s) for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else (-1, None)


def _token_logprob(response: Any, top_n: int) -> TokenLogprob:
    import mlx.core as mx

    logprobs = response.logprobs
    top: list[tuple[int, float]] = []
    if top_n > 0:
        ids = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        pairs = zip(
            cast(list[int], ids.tolist()), cast(list[float], logprobs[ids].tolist()), strict=True
        )
        top = sorted(((t, v) for t, v in pairs if math.isfinite(v)), key=lambda p: -p[1])
    return TokenLogprob(int(response.token), float(logprobs[response.token].item()), top)


def _logprobs_of_text(
    lm: LoadedLM, entries: list[TokenLogprob], text: str, full_text: str
) -> list[TokenLogprob]:
    """The entries of the tokens that start inside ``text`` (a stop sequence cut ``full_text``)."""
    pieces = [lm.vocab.piece(e.token) for e in entries]
    # the detokenizer drops the first token's leading space
    offset = 1 if pieces and pieces[0][:1] == b" " and not full_text.startswith(" ") else 0
    limit, kept = len(text.encode()) + offset, []
    for entry, piece in zip(entries, pieces, strict=True):
        if offset >= limit:
            break
        kept.append(entry)
        offset += len(piece)
    return kept


def generate(
    lm: LoadedLM,
    job_input: SamplingParams,
    prompt: list[int],
    max_tokens: int,
    *,
    constraints: list[Any] | None = None,
    top_logprobs: int | None = None,
) -> Generation:
    """Sample up to ``max_tokens`` tokens after ``prompt``, honouring the stop sequences;
    ``constraints`` are extra logits processors, ``top_logprobs`` (not None) collects
    log-probabilities with that many alternatives per token."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if job_input.seed is not None:
        mx.random.seed(job_input.seed)
    sampler = make_sampler(
        temp=job_input.temperature,
        top_p=job_input.top_p,
        min_p=job_input.min_p,
        top_k=job_input.top_k,
    )
    processors = make_logits_processors(repetition_penalty=job_input.repetition_penalty)
    processors += constraints or []
    stops = job_input.stop_sequences()
    longest_stop = max((len(s) for s in stops), default=0)
    text, finish_reason, generated, tps = "", "length", 0, 0.0
    stopped_by: str | None = None
    entries: list[TokenLogprob] = []
    start = time.perf_counter()
    for response in stream_generate(
        lm.model,
        lm.tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
    ):
        cancel.check()
        if top_logprobs is not None and response.finish_reason != "stop":  # "stop": an EOS token
            entries.append(_token_logprob(response, top_logprobs))
        search_from = max(0, len(text) - longest_stop)
        text += response.text
        generated = response.generation_tokens
        tps = response.generation_tps
        if stops:
            cut, stopped_by = earliest_stop(text, stops, search_from)
            if stopped_by is not None:
                if entries:
                    entries = _logprobs_of_text(lm, entries, text[:cut], text)
                text, finish_reason = text[:cut], "stop"
                break
        if response.finish_reason is not None:
            finish_reason = "length" if response.finish_reason == "length" else "stop"
    inference_ms = (time.perf_counter() - start) * 1000
    return Generation(
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=len(prompt),
        completion_tokens=generated,
        inference_ms=round(inference_ms, 3),
        tokens_per_s=round(tps, 3),
        stop_sequence=stopped_by,
        logprobs=entries if top_logprobs is not None else None,
    )


def _json_content(job_input: ChatCompletionInput, gen: Generation) -> str:
    fmt = job_input.response_format
    assert fmt is not None
    what = f"response_format {fmt.type}" + (
        f" {fmt.json_schema.name!r}" if fmt.json_schema is not None else ""
    )
    text = gen.text.strip()
    try:
        value = json.loads(text)
    except ValueError as e:
        if gen.stop_sequence is not None:
            why = f"the stop sequence {gen.stop_sequence!r} cut the JSON value"
        elif gen.finish_reason == "length":
            why = "the output reached max_tokens before the JSON value was complete"
        else:
            why = f"the output is not JSON ({e})"
        raise output_error(f"{what}: {why}") from e
    if fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
        violation = schema_violation(value, fmt.json_schema.schema_)
        if violation is not None:
            raise output_error(f"{what}: the output does not match the schema: {violation}")
    return text


def _chat_message(
    lm: LoadedLM, job_input: ChatCompletionInput, plan: ChatPlan, gen: Generation
) -> tuple[dict[str, Any], str]:
    """The assistant message of a chat generation, and its finish reason."""
    if job_input.json_mode():
        return {"role": "assistant", "content": _json_content(job_input, gen)}, gen.finish_reason
    tokenizer = lm.tokenizer
    split = split_output(tokenizer, gen.text, plan.initial_state, with_tools=bool(plan.tools))
    calls = openai_tool_calls(tokenizer, split, plan.tools, gen.finish_reason)
    if plan.tools and job_input.tool_call_required() and not calls:
        raise output_error(
            f"tool_choice {job_input.tool_choice!r} requires a tool call and the model made none "
            f"(finish_reason {gen.finish_reason!r})"
        )
    message: dict[str, Any] = {"role": "assistant", "content": split.content}
    if split.reasoning is not None:
        message["reasoning_content"] = split.reasoning
    finish_reason = gen.finish_reason
    if calls:
        message["content"] = split.content or None
        message["tool_calls"] = calls
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return message, finish_reason


def _logprobs_object(lm: LoadedLM, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        return {
            "token": lm.vocab.text(token),
            "logprob": logprob,
            "bytes": list(lm.vocab.piece(token)),
        }

    content = [
        {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_object(
    job: Job,
    model_id: str,
    gen: Generation,
    created: int,
    message: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` (with ``message``, default: the plain text) or
    ``text_completion`` object for a generation."""
    usage = {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }
    if job.kind is Kind.CHAT_COMPLETION:
        choice: dict[str, Any] = {
            "index": 0,
            "message": message or {"role": "assistant", "content": gen.text},
            "logprobs": logprobs,
            "finish_reason": finish_reason or gen.finish_reason,
        }
        return {
            "id": f"chatcmpl-{job.spec.id}",
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [choice],
            "usage": usage,
        }
    assert isinstance(job.input, CompletionInput)
    text = job.input.prompt_text() + gen.text if job.input.echo else gen.text
    return {
        "id": f"cmpl-{job.spec.id}",
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
        ],
        "usage": usage,
    }


@dataclass(frozen=True)
class JobPlan:
    """Everything a generation for one job needs, decided before the first token."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    chat: ChatPlan | None = None
    """The chat plan (tools, initial state) of a chat job; None for a text completion."""
    constraints: list[Any] = field(default_factory=list)
    top_logprobs: int | None = None


def plan_job(lm: LoadedLM, job: Job) -> JobPlan:
    """The prompt, limits and constraints of a chat or text completion job (``InvalidInput``
    for what the model cannot run)."""
    job_input = job.input
    if isinstance(job_input, ChatCompletionInput):
        max_tokens = job_input.token_limit(lm.spec.default_max_tokens)
        _check_schema(job_input)
        chat = _render_chat(lm, job_input)
        return JobPlan(
            prompt=chat.prompt,
            max_tokens=max_tokens,
            params=job_input,
            chat=chat,
            constraints=_constraints(lm, job_input, chat),
            top_logprobs=(job_input.top_logprobs or 0) if job_input.logprobs else None,
        )
    assert isinstance(job_input, CompletionInput)
    prompt = [int(t) for t in lm.tokenizer.encode(job_input.prompt_text())]
    max_tokens = job_input.token_limit(lm.spec.default_max_tokens)
    return JobPlan(prompt=prompt, max_tokens=max_tokens, params=job_input)


def job_result(lm: LoadedLM, job: Job, plan: JobPlan, gen: Generation) -> dict[str, Any]:
    """The OpenAI result of a finished generation (``output_error`` when a chat job's output
    breaks what it asked for: JSON, a required tool call)."""
    created = int(time.time())
    if plan.chat is None:
        return completion_object(job, lm.spec.id, gen, created)
    job_input = job.input
    assert isinstance(job_input, ChatCompletionInput)
    message, finish_reason = _chat_message(lm, job_input, plan.chat, gen)
    logprobs = None if gen.logprobs is None else _logprobs_object(lm, gen.logprobs)
    return completion_object(job, lm.spec.id, gen, created, message, finish_reason, logprobs)


def run(lm: LoadedLM, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a chat or text completion job: (OpenAI result, metrics)."""
    plan = plan_job(lm, job)
    gen = generate(
        lm,
        plan.params,
        plan.prompt,
        plan.max_tokens,
        constraints=plan.constraints,
        top_logprobs=plan.top_logprobs,
    )
    return job_result(lm, job, plan, gen), gen.metrics()


# the batch engine of this kind (``registry.engine``); imported last, as it builds on this module
from mlx_fusion.registry.kinds.lm_batch import LMBatchEngine as BatchEngine  # noqa: E402, F401
