"""Token streaming: a chat or text completion job submitted with ``stream: true`` publishes its
output as it is produced, as OpenAI stream chunks, to a Redis Stream of its own
(``<prefix>:stream:<job id>``), bounded in length and expiring. The job record stays the source
of truth: the stream is a best-effort copy that Tier 2 relays as server-sent events.

Each stream entry has the fields ``type`` (``chunk`` | ``done`` | ``error``), ``seq`` (0, 1, 2,
... per entry, so a reader notices entries it missed), ``produced_at`` (Unix time in seconds when
the model produced it) and ``chunk`` (JSON, on ``chunk`` entries) or ``error`` (JSON
``{code, message}``, on ``error`` entries). A stream ends with exactly one ``done`` or ``error``
entry. Readers: ``read_stream`` here, ``Client.stream`` (which also watches the job record), or
``XREAD`` from any language (docs/contract.md#streaming).

Chunk building (pure functions of a ``ChunkContext``) is kept apart from writing
(``StreamWriter``) and reading (``read_stream``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis

from mlx_fusion.errors import FusionError, StreamTimeout, StreamUnavailable, error_from_dict
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.inputs.text import ChatCompletionInput, CompletionInput, SamplingParams

log = structlog.get_logger(__name__)

STREAM_MAX_LEN = 10_000
"""A job's stream keeps about this many entries (``XADD MAXLEN ~``); older ones are trimmed."""

STREAM_TTL_S = 3600
"""A job's stream expires this long after its last entry was written."""

STREAM_READ_TIMEOUT_S = 120.0
"""How long a reader waits for the next entry (the first one included) before giving up."""

STREAM_BLOCK_MS = 1000
"""How long one ``XREAD BLOCK`` waits; ``Client.stream`` looks at the job record between them."""

STREAM_READ_COUNT = 1000
"""Most entries one ``XREAD`` returns."""

STREAM_KINDS = frozenset({Kind.CHAT_COMPLETION, Kind.COMPLETION})
"""The job kinds that can stream."""

ENTRY_CHUNK = "chunk"
"""``type`` of an entry that carries one chunk."""

ENTRY_DONE = "done"
"""``type`` of the last entry of a stream that finished (SSE ``data: [DONE]``)."""

ENTRY_ERROR = "error"
"""``type`` of the last entry of a stream whose job failed or was cancelled."""


def stream_key(prefix: str, job_id: str) -> str:
    """The Redis Stream of job ``job_id``'s tokens (``prefix`` is the queue prefix)."""
    return f"{prefix}:stream:{job_id}"


def chunk_id(kind: Kind | str, job_id: str) -> str:
    """The ``id`` of a job's chunks: the id of its non-streamed result (``chatcmpl-<id>`` or
    ``cmpl-<id>``)."""
    return f"chatcmpl-{job_id}" if Kind(kind) is Kind.CHAT_COMPLETION else f"cmpl-{job_id}"


@dataclass(frozen=True)
class ChunkContext:
    """What every chunk of one job's stream repeats."""

    kind: Kind
    job_id: str
    model: str
    created: int
    include_usage: bool = False

    @property
    def chat(self) -> bool:
        """Whether the chunks are ``chat.completion.chunk`` objects (else ``text_completion``)."""
        return self.kind is Kind.CHAT_COMPLETION


def _chunk(ctx: ChunkContext, choices: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": chunk_id(ctx.kind, ctx.job_id),
        "object": "chat.completion.chunk" if ctx.chat else "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": choices,
    }
    if ctx.include_usage:
        out["usage"] = None  # as OpenAI: null on every chunk but the last
    return out


def _choice(
    ctx: ChunkContext, content: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    body = {"delta": content} if ctx.chat else {"text": content.get("content", "")}
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}


def role_chunk(ctx: ChunkContext) -> dict[str, Any]:
    """The first chunk of a chat stream: ``delta: {"role": "assistant", "content": ""}``."""
    if not ctx.chat:
        raise ValueError("only chat streams start with a role chunk")
    return _chunk(ctx, [_choice(ctx, {"role": "assistant", "content": ""}, None)])


def content_chunk(ctx: ChunkContext, text: str) -> dict[str, Any]:
    """A chunk carrying the next piece of the output (``delta.content`` or ``text``)."""
    return _chunk(ctx, [_choice(ctx, {"content": text}, None)])


def tool_calls_chunk(ctx: ChunkContext, calls: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A chat chunk carrying whole tool calls (``delta.tool_calls``, each with its ``index``),
    as in the non-streamed ``message.tool_calls``."""
    if not ctx.chat:
        raise ValueError("only chat streams carry tool calls")
    indexed = [{"index": i, **call} for i, call in enumerate(calls)]
    return _chunk(ctx, [_choice(ctx, {"tool_calls": indexed}, None)])


def finish_chunk(ctx: ChunkContext, finish_reason: str) -> dict[str, Any]:
    """The chunk with the ``finish_reason`` (an empty ``delta`` / ``text``)."""
    return _chunk(ctx, [_choice(ctx, {} if ctx.chat else {"content": ""}, finish_reason)])


def usage_chunk(ctx: ChunkContext, usage: Mapping[str, Any]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    out = _chunk(ctx, [])
    out["usage"] = dict(usage)
    return out


def entry_fields(
    entry_type: str,
    seq: int,
    produced_at: float,
    *,
    chunk: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The fields of one stream entry."""
    fields = {"type": entry_type, "seq": str(seq), "produced_at": repr(float(produced_at))}
    if chunk is not None:
        fields["chunk"] = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
    if error is not None:
        fields["error"] = json.dumps(error, ensure_ascii=False, separators=(",", ":"))
    return fields


class StreamWriter:
    """Publishes one job attempt's chunks. Every call is one pipeline round trip (``XADD`` with
    ``MAXLEN ~ max_len``, then ``EXPIRE ttl_s``); the first also deletes what an earlier attempt
    of the job wrote, and (chat) puts the role chunk first. End with ``finish`` or ``fail``
    before the job's final record is written, so a reader that sees the record final has the
    whole stream. Nothing here raises: a failed write is logged, and the writer then drops
    everything after it (the job record still gets the result)."""

    def __init__(
        self,
        connection: Redis,
        prefix: str,
        job_id: str,
        *,
        kind: Kind | str,
        model: str,
        created: int,
        include_usage: bool = False,
        max_len: int = STREAM_MAX_LEN,
        ttl_s: int = STREAM_TTL_S,
    ) -> None:
        self.connection = connection
        self.key = stream_key(prefix, job_id)
        self.context = ChunkContext(Kind(kind), job_id, model, created, include_usage)
        self.max_len = max_len
        self.ttl_s = ttl_s
        self.closed = False
        """True once ``finish`` or ``fail`` was called: later calls do nothing."""
        self.broken = False
        """True once a write failed: nothing more is written."""
        self._seq = 0

    def delta(self, text: str, produced_at: float) -> None:
        """Publish the next piece of output text (empty pieces are skipped)."""
        if text:
            self._write([(ENTRY_CHUNK, content_chunk(self.context, text), None)], produced_at)

    def tool_calls(self, calls: Sequence[Mapping[str, Any]], produced_at: float) -> None:
        """(Chat) publish the tool calls of the answer, all in one chunk."""
        if calls:
            self._write([(ENTRY_CHUNK, tool_calls_chunk(self.context, calls), None)], produced_at)

    def finish(
        self,
        finish_reason: str,
        usage: Mapping[str, Any] | None = None,
        *,
        produced_at: float | None = None,
    ) -> None:
        """End the stream: the ``finish_reason`` chunk, the usage chunk (when the job asked for
        it and ``usage`` is given), then the ``done`` entry."""
        items: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = [
            (ENTRY_CHUNK, finish_chunk(self.context, finish_reason), None)
        ]
        if self.context.include_usage and usage is not None:
            items.append((ENTRY_CHUNK, usage_chunk(self.context, usage), None))
        items.append((ENTRY_DONE, None, None))
        self._write(items, time.time() if produced_at is None else produced_at, last=True)

    def fail(self, code: str, message: str, *, produced_at: float | None = None) -> None:
        """End the stream with an ``error`` entry (the job failed or was cancelled) so readers
        stop instead of waiting."""
        error = {"code": code, "message": message}
        at = time.time() if produced_at is None else produced_at
        self._write([(ENTRY_ERROR, None, error)], at, last=True, role=False)

    def _write(
        self,
        items: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]],
        produced_at: float,
        *,
        last: bool = False,
        role: bool = True,
    ) -> None:
        if self.closed or self.broken:
            return
        self.closed = last
        first = self._seq == 0
        if first and role and self.context.chat:
            items = [(ENTRY_CHUNK, role_chunk(self.context), None), *items]
        try:
            pipe = self.connection.pipeline(transaction=False)
            if first:
                pipe.delete(self.key)  # what an earlier attempt of this job wrote
            for entry_type, chunk, error in items:
                fields: dict[Any, Any] = entry_fields(
                    entry_type, self._seq, produced_at, chunk=chunk, error=error
                )
                pipe.xadd(self.key, fields, maxlen=self.max_len, approximate=True)
                self._seq += 1
            pipe.expire(self.key, self.ttl_s)
            pipe.execute()
        except Exception as e:  # a stream write must never fail the job: the record is the truth
            self.broken = True
            log.warning(
                "stream_write_failed",
                key=self.key,
                seq=self._seq,
                error=f"{type(e).__name__}: {e}",
            )


def writer_for_job(
    connection: Redis,
    prefix: str,
    job: Job,
    model: str,
    *,
    created: int | None = None,
    max_len: int = STREAM_MAX_LEN,
    ttl_s: int = STREAM_TTL_S,
) -> StreamWriter | None:
    """The writer of ``job``'s stream when it asked for one (``stream: true`` on a chat or text
    completion), else None. ``model`` is the catalog id the result names."""
    if job.kind not in STREAM_KINDS or not isinstance(job.input, SamplingParams):
        return None
    if not job.input.stream:
        return None
    return StreamWriter(
        connection,
        prefix,
        job.spec.id,
        kind=job.kind,
        model=model,
        created=int(time.time()) if created is None else created,
        include_usage=job.input.include_usage(),
        max_len=max_len,
        ttl_s=ttl_s,
    )


@dataclass(frozen=True)
class StreamEntry:
    """One entry read from a job's stream."""

    id: str
    """The Redis entry id (resume reading after it)."""
    type: str
    """``chunk``, ``done`` or ``error``."""
    seq: int
    """Position in the stream: 0, 1, 2, ..."""
    produced_at: float
    """Unix time (s) when the model produced it (the worker's clock)."""
    received_at: float
    """Unix time (s) when this reader received it (this host's clock)."""
    chunk: dict[str, Any] | None = None
    """The OpenAI chunk (``chunk`` entries)."""
    error: dict[str, Any] | None = None
    """``{code, message}`` (``error`` entries)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entry(entry_id: Any, fields: Mapping[Any, Any], received_at: float) -> StreamEntry:
    """A raw ``XREAD`` entry as a ``StreamEntry``; ``StreamUnavailable`` if it is malformed."""
    decoded = {_text(k): _text(v) for k, v in fields.items()}
    try:
        entry_type = decoded["type"]
        if entry_type not in (ENTRY_CHUNK, ENTRY_DONE, ENTRY_ERROR):
            raise ValueError(f"unknown type {entry_type!r}")
        chunk = json.loads(decoded["chunk"]) if entry_type == ENTRY_CHUNK else None
        error = json.loads(decoded["error"]) if entry_type == ENTRY_ERROR else None
        return StreamEntry(
            id=_text(entry_id),
            type=entry_type,
            seq=int(decoded["seq"]),
            produced_at=float(decoded["produced_at"]),
            received_at=received_at,
            chunk=chunk,
            error=error,
        )
    except (KeyError, ValueError) as e:
        raise StreamUnavailable(f"stream entry {_text(entry_id)} is malformed: {e!r}") from e


def _raw_entries(response: Any) -> list[tuple[Any, Mapping[Any, Any]]]:
    if not response:
        return []
    streams = response.values() if isinstance(response, Mapping) else [s[1] for s in response]
    return [(entry_id, fields) for entries in streams for entry_id, fields in entries]


def _gap(job_id: str, expected: int, seq: int, read: int) -> StreamUnavailable:
    if seq < expected:
        why = (
            f"the job started again (a new attempt) after {read} entries were read, so its "
            "stream restarted"
        )
    elif read == 0:
        why = f"its first {seq} entries were trimmed (the stream keeps about the last entries)"
    else:
        why = f"entries {expected} to {seq - 1} are missing"
    return StreamUnavailable(
        f"the stream of job {job_id} is incomplete: {why}; the job record has the whole result"
    )


def read_stream(
    connection: Redis,
    prefix: str,
    job_id: str,
    *,
    timeout_s: float = STREAM_READ_TIMEOUT_S,
    block_ms: int = STREAM_BLOCK_MS,
    last_id: str = "0",
    on_idle: Callable[[], None] | None = None,
) -> Iterator[StreamEntry]:
    """Yield the ``chunk`` entries of job ``job_id``'s stream in order, from the start (or after
    ``last_id``), waiting for those not written yet; return after the ``done`` entry.

    Raises the job's own error (``error_from_dict``: ``JobCancelled``, ``JobTimeout``,
    ``InferenceError``, ...) on an ``error`` entry, ``StreamTimeout`` when no entry arrives for
    ``timeout_s`` (the stream may not exist yet: a queued job), and ``StreamUnavailable`` when
    entries are missing (trimmed, or the job ran again). ``on_idle`` runs after each
    ``XREAD BLOCK`` that returned nothing and may raise to stop waiting."""
    key = stream_key(prefix, job_id)
    expected: int | None = 0 if last_id in ("0", "0-0") else None
    read = 0
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            raise StreamTimeout(f"no entry of the stream of job {job_id} ({key}) in {timeout_s} s")
        response = connection.xread(
            {key: last_id}, count=STREAM_READ_COUNT, block=max(1, min(block_ms, remaining_ms))
        )
        raw = _raw_entries(response)
        if not raw:
            if on_idle is not None:
                on_idle()
            continue
        received_at = time.time()
        deadline = time.monotonic() + timeout_s
        for entry_id, fields in raw:
            entry = parse_entry(entry_id, fields, received_at)
            last_id = entry.id
            if expected is not None and entry.seq != expected:
                raise _gap(job_id, expected, entry.seq, read)
            expected = entry.seq + 1
            read += 1
            if entry.type == ENTRY_ERROR:
                raise error_from_dict(entry.error or {})
            if entry.type == ENTRY_DONE:
                return
            yield entry


def ended_without_stream(record: Mapping[str, Any]) -> FusionError:
    """The error for a job whose record is final but whose stream did not end: the job's own
    error when it failed or was cancelled, else ``StreamUnavailable``."""
    job_id = record.get("id")
    status = record.get("status")
    error = record.get("error")
    if status in ("failed", "cancelled") and isinstance(error, Mapping):
        return error_from_dict(dict(error))
    if status == "cancelled":
        return error_from_dict({"code": "cancelled", "message": f"job {job_id} was cancelled"})
    if status == "failed":
        return FusionError(f"job {job_id} failed")
    return StreamUnavailable(
        f"job {job_id} is {status} but its stream did not end (it expired after "
        f"{STREAM_TTL_S} s by default, or could not be written); read the result with get_result"
    )


def not_streamed(record: Mapping[str, Any]) -> StreamUnavailable | None:
    """``StreamUnavailable`` when the job's record shows it never streams (not a chat or text
    completion with ``stream: true``), else None."""
    kind = record.get("kind")
    job_input = record.get("input")
    if kind in STREAM_KINDS and isinstance(job_input, Mapping) and job_input.get("stream") is True:
        return None
    return StreamUnavailable(
        f"job {record.get('id')} ({kind}) was not submitted with stream: true, so it has no "
        "stream; read its result with get or get_result"
    )


class JobStream:
    """A running job's stream as the runner drives it: the pieces a batching model process
    produces go out live (``on_token``); what the model did not stream (a model that runs one job
    at a time, a chat with tools, whose calls are parsed at the end) goes out whole when the job
    completes. Every call is safe: the writer never raises."""

    def __init__(self, writer: StreamWriter, job: Job) -> None:
        self.writer = writer
        self.job = job
        job_input = job.input
        self.live = not (isinstance(job_input, ChatCompletionInput) and job_input.active_tools())
        """False for a chat offering tools: its calls are sent whole, once parsed."""
        self.streamed = False
        self._echo = ""
        if isinstance(job_input, CompletionInput) and job_input.echo:
            self._echo = job_input.prompt_text()
            writer.delta(self._echo, time.time())

    def on_token(self, piece: Mapping[str, Any]) -> None:
        """A piece the model produced: ``{"text", "produced_at"}``."""
        self.streamed = True
        self.writer.delta(
            str(piece.get("text", "")), float(piece.get("produced_at") or time.time())
        )

    def complete(self, result: Mapping[str, Any]) -> None:
        """Send what was not streamed, then the finish (and usage) chunks."""
        choice = (result.get("choices") or [{}])[0]
        now = time.time()
        if "message" in choice:
            message = choice.get("message") or {}
            if not self.streamed and message.get("content"):
                self.writer.delta(str(message["content"]), now)
            if message.get("tool_calls"):
                self.writer.tool_calls(message["tool_calls"], now)
        elif not self.streamed:
            self.writer.delta(str(choice.get("text", ""))[len(self._echo) :], now)
        self.writer.finish(str(choice.get("finish_reason") or "stop"), result.get("usage"))

    def fail(self, error: Mapping[str, Any]) -> None:
        """End the stream with the job's error (failed or cancelled)."""
        self.writer.fail(str(error.get("code", "error")), str(error.get("message", "")))
