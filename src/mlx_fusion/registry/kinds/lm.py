"""Language models through mlx-lm: chat and text completions, OpenAI-shaped results.

Exports the names every kind module has: ``JOB_KINDS``, ``load(spec)`` and ``run(model, job)``.
MLX is imported inside the functions, so importing this module does not initialise it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlx_fusion.errors import InvalidInput, ModelLoadError
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.inputs import ChatCompletionInput, CompletionInput, SamplingParams
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})
"""The job kinds a language model runs."""


@dataclass(frozen=True)
class LoadedLM:
    """A loaded mlx-lm model with its tokenizer."""

    spec: ModelSpec
    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class Generation:
    """What one generation produced."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    inference_ms: float
    tokens_per_s: float


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


def _prompt_tokens(lm: LoadedLM, job_input: SamplingParams) -> list[int]:
    tokenizer = lm.tokenizer
    if isinstance(job_input, ChatCompletionInput):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in job_input.messages
        ]
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidInput(
                f"model {lm.spec.id!r} has no chat template; use kind 'completion'", field="kind"
            )
        tokens: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(tokens, Mapping):
            tokens = tokens["input_ids"]
        return [int(t) for t in tokens]
    assert isinstance(job_input, CompletionInput)
    return [int(t) for t in tokenizer.encode(job_input.prompt_text())]


def _earliest_stop(text: str, stops: list[str], search_from: int) -> int:
    hits = [i for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else -1


def generate(lm: LoadedLM, job_input: SamplingParams, max_tokens: int) -> Generation:
    """Sample up to ``max_tokens`` tokens, honouring the stop sequences."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    prompt = _prompt_tokens(lm, job_input)
    if job_input.seed is not None:
        mx.random.seed(job_input.seed)
    sampler = make_sampler(
        temp=job_input.temperature,
        top_p=job_input.top_p,
        min_p=job_input.min_p,
        top_k=job_input.top_k,
    )
    processors = make_logits_processors(repetition_penalty=job_input.repetition_penalty)
    stops = job_input.stop_sequences()
    longest_stop = max((len(s) for s in stops), default=0)
    text, finish_reason, generated, tps = "", "length", 0, 0.0
    start = time.perf_counter()
    for response in stream_generate(
        lm.model,
        lm.tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
    ):
        search_from = max(0, len(text) - longest_stop)
        text += response.text
        generated = response.generation_tokens
        tps = response.generation_tps
        if stops and (cut := _earliest_stop(text, stops, search_from)) >= 0:
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
    )


def completion_object(job: Job, model_id: str, gen: Generation, created: int) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` or ``text_completion`` object for a generation."""
    usage = {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }
    if job.kind is Kind.CHAT_COMPLETION:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": gen.text},
            "logprobs": None,
            "finish_reason": gen.finish_reason,
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


def run(lm: LoadedLM, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a chat or text completion job: (OpenAI result, metrics)."""
    job_input = job.input
    assert isinstance(job_input, (ChatCompletionInput, CompletionInput))
    gen = generate(lm, job_input, job_input.token_limit(lm.spec.default_max_tokens))
    result = completion_object(job, lm.spec.id, gen, created=int(time.time()))
    metrics = {
        "inference_ms": gen.inference_ms,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "tokens_per_s": gen.tokens_per_s,
    }
    return result, metrics
