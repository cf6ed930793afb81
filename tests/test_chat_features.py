"""Chat features end to end: tools and tool_choice, response_format (JSON mode and schemas),
logprobs and reasoning content. Real Redis, a real worker with each model in a spawned process,
and tiny models steered to emit exact text (``steered_models``), plus SmolLM2 for JSON mode."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_MODEL, write_catalog
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer
from steered_models import (
    START,
    STEERED_TEMPLATE,
    THINK_END,
    THINK_START,
    TOOL_END,
    TOOL_START,
    build_steered_llama,
    build_steered_tokenizer,
)

from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.registry.kinds.lm_json import feed_bytes, may_end, start_state
from mlx_fusion.registry.kinds.lm_schema import SchemaError, check_schema, schema_violation

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ANSWER = '{"answer": "Paris", "confidence": 0.9}'
THOUGHT = "The user says hi."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number", "maximum": 1}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def steered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The steered models, by catalog id (see each one's script)."""
    root = tmp_path_factory.mktemp("steered")
    pieces = [CALL, ANSWER, THOUGHT, "Hello!", "Sure! ", "Here you go.", "Let me check."]
    tokenizer = build_steered_tokenizer(root / "tokenizer", pieces)
    generation_prompt = "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n"
    assert STEERED_TEMPLATE.count(generation_prompt) == 1
    opens_thinking = STEERED_TEMPLATE.replace(generation_prompt, generation_prompt + THINK_START)
    thinking_tokenizer = build_steered_tokenizer(root / "thinking", pieces, opens_thinking)
    call_chain = [TOOL_START, CALL, TOOL_END]
    return {
        # always calls get_weather
        "steer-tools": build_steered_llama(root / "tools", tokenizer, call_chain),
        # answers in text; calling get_weather is its second choice
        "steer-chatty": build_steered_llama(
            root / "chatty",
            tokenizer,
            ["Let me check."],
            alternatives={START: TOOL_START},
            branches=[call_chain],
        ),
        # thinks, then answers
        "steer-think": build_steered_llama(
            root / "think", tokenizer, [THINK_START, THOUGHT, THINK_END, "Hello!"]
        ),
        # its chat template opens the thinking block; it thinks on, then answers
        "steer-opened-think": build_steered_llama(
            root / "opened-think", thinking_tokenizer, [THOUGHT, THINK_END, "Hello!"]
        ),
        # answers in prose; the JSON answer is its second choice
        "steer-json": build_steered_llama(
            root / "json", tokenizer, ["Sure! ", "Here you go."], alternatives={START: ANSWER}
        ),
    }


@pytest.fixture
def catalog(tmp_path: Path, tiny_model_dir: Path, steered: dict[str, Path]) -> Path:
    models: dict[str, dict[str, Any]] = {TINY_MODEL: {"kind": "lm", "path": tiny_model_dir}}
    models.update({name: {"kind": "lm", "path": path} for name, path in steered.items()})
    return write_catalog(tmp_path / "chat.toml", models)


def chat(model: str, **input_fields: Any) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 8,
        "temperature": 0,
        **input_fields,
    }
    return {"kind": "chat.completion", "model": model, "input": body}


def run_all(client: Any, make_worker: Any, catalog: Path, *docs: dict[str, Any]) -> list[Any]:
    """Submit ``docs``, let one worker drain the queue, and return their records."""
    ids = [client.submit(doc) for doc in docs]
    make_worker(catalog_path=catalog).work(burst=True)
    return [client.get(job_id) for job_id in ids]


def completed_choice(record: dict[str, Any]) -> dict[str, Any]:
    assert record["status"] == "completed", record.get("error")
    choice: dict[str, Any] = record["result"]["choices"][0]
    return choice


def failed_error(record: dict[str, Any]) -> dict[str, Any]:
    assert record["status"] == "failed", record.get("result")
    error: dict[str, Any] = record["error"]
    return error


def enqueue_raw(redis: Redis, job_id: str, document: dict[str, Any]) -> None:
    """Enqueue without the client's validation, as a producer in another language might."""
    Queue("fusion:default", connection=redis, serializer=JSONSerializer).enqueue_call(
        func=JOB_FUNCTION, args=[document], job_id=job_id
    )


# ----- tools -----------------------------------------------------------------------------


def test_tool_call_comes_back_as_openai_tool_calls(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    (record,) = run_all(client, make_worker, catalog, chat("steer-tools", tools=[WEATHER, CLOCK]))
    choice = completed_choice(record)
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_a_conversation_with_tool_results_is_rendered_and_answered(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    arguments = json.dumps({"city": "Paris"})
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    (record,) = run_all(
        client, make_worker, catalog, chat("steer-tools", messages=messages, tools=[WEATHER])
    )
    assert completed_choice(record)["finish_reason"] == "tool_calls"
    assert record["result"]["usage"]["prompt_tokens"] > 20


def test_tool_choice_none_shows_no_tools_and_parses_no_calls(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    doc = chat("steer-tools", tools=[WEATHER], tool_choice="none", max_tokens=8)
    (record,) = run_all(client, make_worker, catalog, doc)
    choice = completed_choice(record)
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == f"{TOOL_START}{CALL}{TOOL_END}"


def test_tool_choice_required_forces_a_call_the_model_would_not_make(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    auto, required = run_all(
        client,
        make_worker,
        catalog,
        chat("steer-chatty", tools=[WEATHER]),
        chat("steer-chatty", tools=[WEATHER], tool_choice="required"),
    )
    assert completed_choice(auto)["message"] == {"role": "assistant", "content": "Let me check."}
    choice = completed_choice(required)
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]


def test_named_tool_choice_forces_that_tool(client: Any, make_worker: Any, catalog: Path) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    (record,) = run_all(
        client,
        make_worker,
        catalog,
        chat("steer-chatty", tools=[CLOCK, WEATHER], tool_choice=named),
    )
    (call,) = completed_choice(record)["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


def test_a_call_to_another_tool_than_the_named_one_fails_the_job(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    (record,) = run_all(
        client, make_worker, catalog, chat("steer-tools", tools=[WEATHER, CLOCK], tool_choice=named)
    )
    error = failed_error(record)
    assert error["code"] == "invalid_output"
    assert "'get_weather', which is not among the offered tools (get_time)" in error["message"]


def test_a_tool_call_cut_by_max_tokens_fails_instead_of_leaking_into_content(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    (record,) = run_all(
        client, make_worker, catalog, chat("steer-tools", tools=[WEATHER], max_tokens=1)
    )
    error = failed_error(record)
    assert error["code"] == "invalid_output"
    assert "tool call could not be parsed (the output ended inside it" in error["message"]


def test_tools_for_a_model_without_tool_calling_fail_with_invalid_input(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    bad, good = run_all(
        client, make_worker, catalog, chat(TINY_MODEL, tools=[WEATHER]), chat(TINY_MODEL)
    )
    error = failed_error(bad)
    assert error["code"] == "invalid_input" and error["field"] == "input.tools"
    assert f"model '{TINY_MODEL}' does not support tool calling" in error["message"]
    completed_choice(good)


# ----- reasoning -------------------------------------------------------------------------


def test_thinking_goes_to_reasoning_content(client: Any, make_worker: Any, catalog: Path) -> None:
    (record,) = run_all(client, make_worker, catalog, chat("steer-think"))
    message = completed_choice(record)["message"]
    assert message == {"role": "assistant", "content": "Hello!", "reasoning_content": THOUGHT}


def test_thinking_opened_by_the_chat_template_goes_to_reasoning_content(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    (record,) = run_all(client, make_worker, catalog, chat("steer-opened-think"))
    message = completed_choice(record)["message"]
    assert message == {"role": "assistant", "content": "Hello!", "reasoning_content": THOUGHT}


def test_stop_sequences_apply_to_output_with_reasoning(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    (record,) = run_all(client, make_worker, catalog, chat("steer-think", stop=["Hell"]))
    choice = completed_choice(record)
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "", "reasoning_content": THOUGHT}


# ----- response_format -------------------------------------------------------------------


def test_json_object_constrains_the_output_to_json(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    prose, constrained = run_all(
        client,
        make_worker,
        catalog,
        chat("steer-json"),
        chat("steer-json", response_format={"type": "json_object"}),
    )
    assert completed_choice(prose)["message"]["content"] == "Sure! Here you go."
    choice = completed_choice(constrained)
    assert json.loads(choice["message"]["content"]) == json.loads(ANSWER)
    assert choice["finish_reason"] == "stop"


def test_json_schema_output_that_validates_completes(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    (record,) = run_all(client, make_worker, catalog, chat("steer-json", response_format=fmt))
    assert json.loads(completed_choice(record)["message"]["content"])["answer"] == "Paris"


def test_json_schema_output_that_does_not_validate_fails_precisely(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    schema = {**ANSWER_SCHEMA, "properties": {"answer": {"type": "integer"}, "confidence": {}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    (record,) = run_all(client, make_worker, catalog, chat("steer-json", response_format=fmt))
    error = failed_error(record)
    assert error["code"] == "invalid_output"
    assert (
        "response_format json_schema 'answer': the output does not match the schema: "
        "$.answer: expected integer, got string"
    ) in error["message"]


def test_json_cut_by_a_stop_sequence_fails_precisely(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    doc = chat("steer-json", response_format={"type": "json_object"}, stop=['"confidence"'])
    (record,) = run_all(client, make_worker, catalog, doc)
    error = failed_error(record)
    assert error["code"] == "invalid_output"
    assert "the stop sequence '\"confidence\"' cut the JSON value" in error["message"]


def test_a_schema_keyword_that_cannot_be_checked_is_refused_before_running(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    schema = {"type": "object", "properties": {"answer": {"$ref": "#/$defs/answer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    (record,) = run_all(client, make_worker, catalog, chat("steer-json", response_format=fmt))
    error = failed_error(record)
    assert error["code"] == "invalid_input"
    assert error["field"] == "input.response_format.json_schema.schema.properties.answer.$ref"
    assert "unsupported JSON Schema keyword '$ref'" in error["message"]
    assert record["attempts"] == 0


@pytest.mark.slow
def test_smollm2_json_object_answer_is_json(
    client: Any, make_worker: Any, tmp_path: Path, smollm2_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "real.toml", {"smollm2": {"kind": "lm", "path": smollm2_dir}}
    )
    question = 'What is the capital of France? Reply with a JSON object with the key "capital".'
    doc = chat(
        "smollm2",
        messages=[{"role": "user", "content": question}],
        response_format={"type": "json_object"},
        max_tokens=48,
    )
    (record,) = run_all(client, make_worker, catalog, doc)
    content = completed_choice(record)["message"]["content"]
    assert isinstance(json.loads(content), dict)  # unconstrained, it opens with ```json


# ----- logprobs ----------------------------------------------------------------------------


def test_logprobs_list_each_token_with_sorted_alternatives(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    doc = chat("steer-json", logprobs=True, top_logprobs=3)
    (record,) = run_all(client, make_worker, catalog, doc)
    choice = completed_choice(record)
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["Sure! ", "Here you go."]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for entry in entries:
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] <= 0
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        for alternative in top:  # an alternative may be part of a UTF-8 character: U+FFFD
            assert alternative["logprob"] <= 0
            assert bytes(alternative["bytes"]).decode("utf-8", "replace") == alternative["token"]
        # greedy decoding: the chosen token is the most likely one, with the same logprob
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
    assert entries[0]["top_logprobs"][1]["token"] == ANSWER  # the steered second choice


def test_logprobs_end_where_a_stop_sequence_cuts_the_text(
    client: Any, make_worker: Any, catalog: Path
) -> None:
    inside, before = run_all(
        client,
        make_worker,
        catalog,
        chat("steer-json", logprobs=True, stop=["go."]),
        chat("steer-json", logprobs=True, stop=["Here"]),
    )
    choice = completed_choice(inside)  # the stop starts inside the second token: it stays
    assert choice["message"]["content"] == "Sure! Here you "
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["Sure! ", "Here you go."]
    choice = completed_choice(before)
    assert choice["message"]["content"] == "Sure! "
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["Sure! "]


def test_logprobs_cover_every_generated_token(client: Any, make_worker: Any, catalog: Path) -> None:
    doc = chat(TINY_MODEL, logprobs=True, top_logprobs=0, max_tokens=6, temperature=1.0, seed=5)
    (record,) = run_all(client, make_worker, catalog, doc)
    choice = completed_choice(record)
    entries = choice["logprobs"]["content"]
    generated = record["result"]["usage"]["completion_tokens"]
    assert len(entries) == generated - (1 if choice["finish_reason"] == "stop" else 0)
    assert all(e["logprob"] <= 0 and e["top_logprobs"] == [] for e in entries)


def test_without_logprobs_the_field_is_null(client: Any, make_worker: Any, catalog: Path) -> None:
    (record,) = run_all(client, make_worker, catalog, chat("steer-json"))
    assert completed_choice(record)["logprobs"] is None


# ----- invalid inputs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "input.tools.0.function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "input.tools.0.type"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "input.tool_choice"),
        ({"tool_choice": "auto"}, "input.tool_choice"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21"}]},
            "input.messages.1",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "21"},
                ]
            },
            "input.messages",
        ),
        ({"logprobs": True, "top_logprobs": 21}, "input.top_logprobs"),
        ({"top_logprobs": 2}, "input.top_logprobs"),
        ({"response_format": {"type": "xml"}}, "input.response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "input.response_format"),
        (
            {"tools": [WEATHER], "response_format": {"type": "json_object"}},
            "input.response_format",
        ),
    ],
)
def test_bad_chat_inputs_fail_with_invalid_input_and_the_next_job_completes(
    client: Any, make_worker: Any, catalog: Path, redis: Redis, fields: dict[str, Any], field: str
) -> None:
    enqueue_raw(redis, "bad-input", chat("steer-json", **fields))
    good = client.submit(chat("steer-json"))
    make_worker(catalog_path=catalog).work(burst=True)
    error = failed_error(client.get("bad-input"))
    assert error["code"] == "invalid_input" and error["field"] == field, error
    completed_choice(client.get(good))


# ----- the pure parts: JSON grammar and schema subset ---------------------------------------


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.25:
        return {_random_text(rng): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if depth < 4 and roll < 0.45:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.6:
        return _random_text(rng)
    if roll < 0.8:
        return rng.choice([0, -1, 3.5e-3, 12, -0.0, 1e20, 123456789])
    return rng.choice([True, False, None])


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice('ab"\\\n\t\u00e9\u20ac /') for _ in range(rng.randint(0, 5)))


def _grammar_accepts(text: str) -> bool:
    state = feed_bytes(start_state(), text.encode())
    return state is not None and may_end(state)


def _json_accepts(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return text == text.rstrip()  # the grammar ends at the value: no trailing blanks


def test_json_grammar_accepts_exactly_what_json_loads_accepts() -> None:
    rng = random.Random(7)
    for _ in range(500):
        text = json.dumps(_random_json(rng), indent=rng.choice([None, 1]))
        assert _grammar_accepts(text), text
        cut = text[: rng.randint(0, len(text))]
        assert _grammar_accepts(cut) == _json_accepts(cut), cut
    alphabet = '{}[]",:0123456789-+.eEtrufalsn \\u'
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        assert _grammar_accepts(text) == _json_accepts(text), text


def test_json_grammar_holds_the_top_level_type() -> None:
    assert feed_bytes(start_state("object"), b"[") is None
    assert feed_bytes(start_state("array"), b" [") is not None


def test_schema_violations_name_the_path() -> None:
    assert schema_violation({"answer": "Paris", "confidence": 0.9}, ANSWER_SCHEMA) is None
    assert schema_violation({"answer": "Paris"}, ANSWER_SCHEMA) == (
        "$: missing required property 'confidence'"
    )
    assert schema_violation({"answer": "x", "confidence": 2}, ANSWER_SCHEMA) == (
        "$.confidence: breaks maximum 1"
    )
    extra = {"answer": "x", "confidence": 0.1, "why": 1}
    assert schema_violation(extra, ANSWER_SCHEMA) == "$: unexpected property 'why'"
    items = {"type": "array", "items": {"enum": [1, 2]}}
    assert schema_violation([1, 3], items) == "$[1]: must be one of [1, 2]"


def test_schema_check_names_the_unsupported_keyword() -> None:
    with pytest.raises(SchemaError) as e:
        check_schema(
            {"type": "object", "properties": {"a": {"type": "string", "format": "x", "not": {}}}}
        )
    assert e.value.path == "schema.properties.a.not"
