"""Embedding jobs end to end on the real all-MiniLM-L6-v2: Redis -> worker -> model process ->
store. Every job of this file goes through one worker run (one model load, ~5 s on a CPU); each
test then checks the record of its own jobs. Each bad job is followed by a good one, which must
still complete."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    assert_failed_then_next_completed,
    build_worker,
    completed,
    make_store,
    worker_settings,
    write_catalog,
)
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from mlx_fusion.client import Client
from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.registry.kinds.embeddings import BATCH_SIZE, batches, minilm_dir

pytestmark = pytest.mark.slow

MODEL = "minilm"
DIMENSIONS = 384
MAX_TOKENS = 256
SENTENCES = [
    "The cat sits on the mat.",
    "A feline rests on a rug.",
    "Stock prices fell sharply today.",
]
CAT_IDS = [101, 1996, 4937, 7719, 2006, 1996, 13523, 1012, 102]
"""SENTENCES[0] through the MiniLM tokenizer, [CLS] and [SEP] included."""

GOOD_JOBS: dict[str, dict[str, Any]] = {
    "float": {"input": SENTENCES},
    "base64": {"input": SENTENCES, "encoding_format": "base64"},
    "dims64": {"input": SENTENCES, "dimensions": 64, "model": "ignored", "user": "u1"},
    "tokens": {"input": CAT_IDS},
    "token-lists": {"input": [[101, 102], CAT_IDS]},
    "long": {"input": ["word " * 300, "hi"]},
}
BAD_INPUTS: dict[str, dict[str, Any]] = {
    "wrong-type": {"input": 42},
    "missing-input": {"encoding_format": "float"},
    "empty-list": {"input": []},
    "empty-string": {"input": ["fine", ""]},
    "unknown-field": {"input": "x", "normalize": False},
    "too-many": {"input": ["a"] * 2049},
    "dims-too-many": {"input": "hello", "dimensions": DIMENSIONS + 1},
    "unknown-token": {"input": [101, 30522, 102]},
}
"""Bad inputs; the first six fail in the worker, the last two in the model process."""


def embedding_job(job_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "kind": "embedding", "model": MODEL, "input": body}


def enqueue_raw(redis: Redis, document: dict[str, Any]) -> None:
    """Enqueue without the client's validation, as a careless Tier 2 might."""
    Queue("fusion:default", connection=redis, serializer=JSONSerializer).enqueue_call(
        func=JOB_FUNCTION, args=[document], job_id=document["id"]
    )


@pytest.fixture(scope="module")
def records(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every job of this file run by one worker; the final records by job id.

    Module-scoped (conftest's worker fixtures are per test) so the model loads once."""
    try:
        model_dir = minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("embeddings")
    catalog = write_catalog(tmp / "models.toml", {MODEL: {"kind": "embeddings", "path": model_dir}})
    settings = worker_settings(redis_url, tmp / "data", catalog)
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    store = make_store("mongomock", tmp)
    client = Client(settings, redis, store)
    for name, body in GOOD_JOBS.items():
        client.submit(embedding_job(name, body))
    for name, body in BAD_INPUTS.items():
        enqueue_raw(redis, embedding_job(name, body))
        client.submit(embedding_job(f"{name}-next", {"input": "next"}))
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    client.submit({"id": "chat", "kind": "chat.completion", "model": MODEL, "input": chat})
    client.submit(embedding_job("chat-next", {"input": "next"}))

    worker = build_worker(settings, redis, store)
    worker.work(burst=True)
    names = [*GOOD_JOBS, *BAD_INPUTS, *(f"{n}-next" for n in BAD_INPUTS), "chat", "chat-next"]
    yield {name: client.get(name) for name in names}
    redis.flushdb()


def vectors(result: dict[str, Any]) -> np.ndarray:
    return np.array([item["embedding"] for item in result["data"]], dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embedding_job_returns_an_openai_list_with_usage_and_metrics(
    records: dict[str, Any],
) -> None:
    result = completed(records, "float")
    assert result["object"] == "list" and result["model"] == MODEL
    assert [item["object"] for item in result["data"]] == ["embedding"] * 3
    assert [item["index"] for item in result["data"]] == [0, 1, 2]
    vecs = vectors(result)
    assert vecs.shape == (3, DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert result["usage"] == {"prompt_tokens": 27, "total_tokens": 27}  # 9 + 10 + 8
    metrics = records["float"]["metrics"]
    assert metrics["load_ms"] > 0 and metrics["inference_ms"] > 0
    assert metrics["prompt_tokens"] == 27 and metrics["tokens_per_s"] > 0


def test_similar_sentences_are_closer_than_unrelated_ones(records: dict[str, Any]) -> None:
    cat, feline, stocks = vectors(completed(records, "float"))
    assert cosine(cat, feline) > cosine(cat, stocks) + 0.3


def test_base64_decodes_to_the_float_vectors(records: dict[str, Any]) -> None:
    encoded = completed(records, "base64")["data"]
    decoded = np.array([np.frombuffer(base64.b64decode(i["embedding"]), "<f4") for i in encoded])
    np.testing.assert_allclose(decoded, vectors(completed(records, "float")), atol=1e-6)


def test_dimensions_truncates_to_unit_vectors(records: dict[str, Any]) -> None:
    short = vectors(completed(records, "dims64"))
    full = vectors(completed(records, "float"))
    assert short.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    prefix = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-5)


def test_dimensions_beyond_the_model_fail_with_invalid_input(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "dims-too-many", "invalid_input", "input.dimensions"
    )
    assert str(DIMENSIONS) in message


def test_token_ids_skip_the_tokenizer(records: dict[str, Any]) -> None:
    cat = vectors(completed(records, "float"))[0]
    result = completed(records, "tokens")
    assert result["usage"]["prompt_tokens"] == len(CAT_IDS)
    np.testing.assert_allclose(vectors(result)[0], cat, atol=1e-5)


def test_token_id_lists_of_different_lengths_keep_their_order(records: dict[str, Any]) -> None:
    cat = vectors(completed(records, "float"))[0]
    result = completed(records, "token-lists")
    assert result["usage"]["prompt_tokens"] == 2 + len(CAT_IDS)
    np.testing.assert_allclose(vectors(result)[1], cat, atol=1e-5)


def test_token_ids_outside_the_vocabulary_fail_with_the_position(records: dict[str, Any]) -> None:
    assert_failed_then_next_completed(records, "unknown-token", "invalid_input", "input.input.1")


def test_inputs_longer_than_the_model_are_truncated(records: dict[str, Any]) -> None:
    result = completed(records, "long")
    assert result["usage"]["prompt_tokens"] == MAX_TOKENS + 3  # "hi" is [CLS] hi [SEP]


def test_wrong_input_type_fails_with_invalid_input(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "wrong-type", "invalid_input", "input.input"
    )
    assert "list of strings" in message


def test_missing_input_fails_with_invalid_input(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "missing-input", "invalid_input", "input.input"
    )
    assert "required" in message


def test_empty_list_fails_with_invalid_input(records: dict[str, Any]) -> None:
    assert_failed_then_next_completed(records, "empty-list", "invalid_input", "input.input")


def test_empty_string_fails_with_its_position(records: dict[str, Any]) -> None:
    assert_failed_then_next_completed(records, "empty-string", "invalid_input", "input.input.1")


def test_unknown_field_fails_with_invalid_input(records: dict[str, Any]) -> None:
    assert_failed_then_next_completed(records, "unknown-field", "invalid_input", "input.normalize")


def test_more_than_2048_inputs_fail_with_invalid_input(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(records, "too-many", "invalid_input", "input.input")
    assert "2048" in message


def test_chat_job_on_an_embedding_model_fails_with_model_kind_mismatch(
    records: dict[str, Any],
) -> None:
    doc = records["chat"]
    assert doc["status"] == "failed" and doc["error"]["code"] == "model_kind_mismatch"
    assert doc["error"]["field"] == "model"
    completed(records, "chat-next")


def test_minilm_dir_holds_the_model_files() -> None:
    try:
        path = minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert isinstance(path, Path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }


def test_batches_keep_padding_below_double_and_cover_every_input() -> None:
    lengths = [3, 256, 9, 10, 8, 2, *([5] * 40)]
    groups = batches(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) <= BATCH_SIZE and all(2 * lengths[i] >= longest for i in group)
    assert [1] in groups  # the long input runs alone
