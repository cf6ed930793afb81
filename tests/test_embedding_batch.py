"""The embedding ``BatchEngine`` on the real all-MiniLM-L6-v2, in this process: jobs of one step
share forward passes, and each gets what ``run`` gives it alone. The model loads once (~5 s)."""

from __future__ import annotations

import base64
import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest

from mlx_fusion.errors import InvalidInput, JobCancelled, JobTimeout
from mlx_fusion.jobs.document import Job, parse_job
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.engine import Event
from mlx_fusion.registry.kinds import embeddings
from mlx_fusion.registry.kinds.embeddings import BatchEngine, LoadedEmbedder

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sits on the mat.",
    "A feline rests on a rug.",
    "Stock prices fell sharply today.",
]
CAT_IDS = [101, 1996, 4937, 7719, 2006, 1996, 13523, 1012, 102]
POISON_ID = 999
"""A token id (``[unused994]``) on which the wrapped model of the fallback test raises."""

_ids = itertools.count()


@pytest.fixture(scope="module")
def embedder() -> LoadedEmbedder:
    try:
        path = embeddings.minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return embeddings.load(ModelSpec(id="minilm", kind="embeddings", path=path))


def job(body: dict[str, Any]) -> Job:
    document = {"id": f"j{next(_ids)}", "kind": "embedding", "model": "minilm", "input": body}
    return parse_job(document, max_input_bytes=1 << 20)


def run_all(engine: BatchEngine, jobs: list[Job]) -> dict[int, Event]:
    """Submit ``jobs`` (tags 0, 1, ...), step until idle; each tag's event."""
    for tag, j in enumerate(jobs):
        engine.submit(tag, j)
    events: dict[int, Event] = {}
    while engine.busy:
        for event in engine.step():
            assert event.tag not in events
            events[event.tag] = event
    return events


def vectors(result: dict[str, Any]) -> np.ndarray:
    data = result["data"]
    if data and isinstance(data[0]["embedding"], str):
        return np.array([np.frombuffer(base64.b64decode(i["embedding"]), "<f4") for i in data])
    return np.array([item["embedding"] for item in data], dtype=np.float64)


def assert_same_result(batched: dict[str, Any], alone: dict[str, Any]) -> None:
    assert [i["index"] for i in batched["data"]] == [i["index"] for i in alone["data"]]
    assert batched["usage"] == alone["usage"] and batched["model"] == alone["model"]
    np.testing.assert_allclose(vectors(batched), vectors(alone), atol=1e-5)


def done(event: Event) -> tuple[dict[str, Any], dict[str, Any]]:
    assert event.type == "done", event.payload
    result, metrics = event.payload
    return result, metrics


def test_batched_jobs_get_the_vectors_each_job_gets_alone(embedder: LoadedEmbedder) -> None:
    jobs = [
        job({"input": SENTENCES}),
        job({"input": SENTENCES, "dimensions": 64}),
        job({"input": SENTENCES[1], "encoding_format": "base64"}),
        job({"input": CAT_IDS}),
        job({"input": [[101, 102], CAT_IDS]}),
        job({"input": ["word " * 300, "hi"]}),
    ]
    events = run_all(BatchEngine(embedder, max_batch=8), jobs)
    for tag, j in enumerate(jobs):
        result, metrics = done(events[tag])
        alone, alone_metrics = embeddings.run(embedder, j)
        assert_same_result(result, alone)
        assert metrics["prompt_tokens"] == alone_metrics["prompt_tokens"]
        assert metrics["batch_jobs"] == len(jobs) and metrics["inference_ms"] > 0
        assert metrics["tokens_per_s"] > 0


def test_jobs_with_different_input_counts_get_their_own_inputs_back(
    embedder: LoadedEmbedder,
) -> None:
    groups = [[SENTENCES[2]], SENTENCES, [SENTENCES[1], SENTENCES[0]]]
    events = run_all(BatchEngine(embedder, max_batch=8), [job({"input": g}) for g in groups])
    single = {s: vectors(embeddings.run(embedder, job({"input": s}))[0])[0] for s in SENTENCES}
    for tag, group in enumerate(groups):
        result, metrics = done(events[tag])
        assert [item["index"] for item in result["data"]] == list(range(len(group)))
        expected = np.array([single[s] for s in group])
        np.testing.assert_allclose(vectors(result), expected, atol=1e-5)
        tokens = sum(len(embedder.tokenizer(s)["input_ids"]) for s in group)
        assert result["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        assert metrics["prompt_tokens"] == tokens


def test_a_job_run_refuses_fails_at_submit_and_the_others_complete(
    embedder: LoadedEmbedder,
) -> None:
    engine = BatchEngine(embedder, max_batch=8)
    engine.submit(0, job({"input": "first"}))
    with pytest.raises(InvalidInput) as too_wide:
        engine.submit(1, job({"input": "hello", "dimensions": embedder.dimensions + 1}))
    assert too_wide.value.field == "input.dimensions"
    with pytest.raises(InvalidInput) as unknown:
        engine.submit(2, job({"input": [101, embedder.vocab_size, 102]}))
    assert unknown.value.field == "input.input.1"
    engine.submit(3, job({"input": "last"}))
    events = engine.step()
    assert {e.tag: e.type for e in events} == {0: "done", 3: "done"}
    assert all(done(e)[1]["batch_jobs"] == 2 for e in events)
    assert not engine.busy


def test_max_batch_bounds_the_jobs_of_one_step(embedder: LoadedEmbedder) -> None:
    engine = BatchEngine(embedder, max_batch=2)
    for tag, sentence in enumerate(SENTENCES):
        engine.submit(tag, job({"input": sentence}))
    first = engine.step()
    assert [e.tag for e in first] == [0, 1] and engine.busy
    assert [e.tag for e in engine.step()] == [2] and not engine.busy


def test_cancel_of_a_queued_job_ends_it_at_the_next_step(embedder: LoadedEmbedder) -> None:
    engine = BatchEngine(embedder, max_batch=8)
    for tag in range(3):
        engine.submit(tag, job({"input": SENTENCES[tag]}))
    engine.cancel(0)
    engine.cancel(2, timed_out=True)
    events = {e.tag: e for e in engine.step()}
    assert isinstance(events[0].payload, JobCancelled) and events[0].type == "error"
    assert isinstance(events[2].payload, JobTimeout) and events[2].type == "error"
    assert done(events[1])[1]["batch_jobs"] == 1
    engine.cancel(1)  # already done: nothing
    assert not engine.busy and engine.step() == []


class PoisonedModel:
    """The real model, raising on any batch that holds ``POISON_ID``."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, input_ids: Any, **kwargs: Any) -> Any:
        if (input_ids == POISON_ID).any().item():
            raise RuntimeError("poisoned batch")
        return self.model(input_ids, **kwargs)


def test_a_forward_that_raises_fails_only_the_job_that_breaks_it(
    embedder: LoadedEmbedder,
) -> None:
    poisoned = dataclasses.replace(embedder, model=PoisonedModel(embedder.model))
    jobs = [
        job({"input": SENTENCES}),
        job({"input": [[101, POISON_ID, 102], CAT_IDS]}),
        job({"input": CAT_IDS, "dimensions": 32}),
    ]
    events = run_all(BatchEngine(poisoned, max_batch=8), jobs)
    assert events[1].type == "error" and "poisoned batch" in str(events[1].payload)
    for tag in (0, 2):
        result, metrics = done(events[tag])
        assert_same_result(result, embeddings.run(embedder, jobs[tag])[0])
        assert metrics["batch_jobs"] == 1
