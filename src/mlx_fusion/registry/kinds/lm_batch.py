"""Continuous batching for language models: many chat and completion jobs in one mlx-lm
``BatchGenerator`` (see ``registry.engine`` for how a model process drives it).

Each job keeps what it asked for: its own sampler (jobs with the same sampling parameters share
one, so a batch of them samples in one call), repetition penalty, JSON or tool-call
constraints, log-probabilities, stop sequences and token limit. Jobs join the running batch
whenever they arrive and leave it when they finish, fail or are cancelled; nothing one job does
ends another. A job with a ``seed`` runs alone between steps (MLX's random state is global).

A job that arrives while nothing else runs goes through mlx-lm's ``generate_step``, as a single
request would: ``BatchGenerator`` with one sequence decodes at about 60% of its speed (measured
on an H200). When a second job arrives, the first moves into the batch with its KV cache, less
the token not yet fed, and carries on from where it was.

Jobs join the batch in groups. Every prefill pass stalls the whole batch for a cost that hardly
depends on how many prompts it holds (on an H200 with an 8B model: about 130 ms for 32 prompts
of 128 tokens at once, 60 to 150 ms for each of eight passes of 1 to 8), so arrivals wait out
of the batch while more keep coming: they join once no job has arrived for ``JOIN_QUIET_S``, or
once the oldest has waited ``JOIN_HOLD_S``, or when they fill the batch. The running sequences
step on meanwhile. A pass takes every waiting prompt (up to the batch limit), in chunks of at
most ``PREFILL_TOKENS`` tokens in all.

Prompt prefixes are reused: the KV cache of every finished sequence goes into mlx-lm's
``LRUPromptCache`` (bounded in bytes), and a new job starts from the longest cached prefix of
its prompt (a shared system prompt, the earlier turns of a chat).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from mlx_fusion.errors import FusionError, InvalidInput, JobCancelled, JobTimeout
from mlx_fusion.jobs.document import Job
from mlx_fusion.registry.engine import Event
from mlx_fusion.registry.kinds import lm

DEFAULT_PROMPT_CACHE_BYTES = 512 * 1024 * 1024
"""Bytes of reusable KV caches a model keeps when its catalog entry sets none."""

PROMPT_CACHE_ENTRIES = 64
"""Most cached prompts per model (LRU beyond that, and beyond the byte bound)."""

PREFILL_TOKENS = 16384
"""Most prompt tokens one prefill pass processes (the batch's prompts are cut into chunks of at
most this many tokens in all, 256 to 2,048 tokens each): what bounds a pass's activations."""

_PREFILL_CHUNK_TOKENS = (256, 2048)
"""The least and most tokens of one prompt in one prefill pass."""

JOIN_QUIET_S = 0.02
"""Waiting jobs join the batch once no other job has arrived for this long (a worker hands the
jobs it claimed together to the model process a few milliseconds apart)."""

JOIN_HOLD_S = 0.25
"""Longest a job waits out of the batch for more arrivals to join with it."""

_MODEL_KEY = "model"
"""The prompt cache's model key: one model per process."""


@lru_cache(maxsize=256)
def _sampler(temp: float, top_p: float, min_p: float, top_k: int) -> Any:
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


@dataclass
class _Response:
    """One token of a sequence running alone, shaped like ``BatchGenerator``'s responses."""

    token: int
    logprobs: Any
    finish_reason: str | None
    uid: int | None = None
    prompt_cache: Any = None
    all_tokens: Any = None


@dataclass
class _Alone:
    """The sequence running by itself on ``generate_step``."""

    seq: Any
    steps: Any
    """The ``generate_step`` iterator."""
    cache: list[Any]
    """Its KV cache, one token ahead of the last token taken (``generate_step`` feeds it on)."""
    rest: list[int]
    """The prompt tokens it was started with (after a cached prefix)."""


@dataclass
class _Sequence:
    tag: int
    job: Job
    plan: lm.JobPlan
    detokenizer: Any
    stream: bool
    cached_tokens: int
    submitted: float = field(default_factory=lambda: time.perf_counter())
    first_token: float | None = None
    text: str = ""
    sent: int = 0
    """Characters of ``text`` already streamed."""
    tokens: int = 0
    logprobs: list[lm.TokenLogprob] = field(default_factory=list)
    batch_peak: int = 0
    uid: int | None = None
    generated: list[int] = field(default_factory=list)
    sampler: Any = None
    processors: list[Any] = field(default_factory=list)

    stops: list[str] = field(default_factory=list)
    """The job's stop sequences, read once (checked after every token)."""
    longest_stop: int = 0


@dataclass
class _Waiting:
    """A planned job waiting to join the batch."""

    seq: _Sequence
    cache: Any
    """A KV cache of the cached prefix of its prompt, or None."""
    rest: list[int]
    """The prompt tokens still to process."""


class LMBatchEngine:
    """A ``registry.engine.BatchEngine`` over mlx-lm's ``BatchGenerator``."""

    def __init__(self, model: lm.LoadedLM, max_batch: int) -> None:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import LRUPromptCache

        self.lm = model
        self.max_batch = max(1, max_batch)
        eos = sorted(int(t) for t in model.tokenizer.eos_token_ids)
        self._generator = BatchGenerator(
            model.model,
            stop_tokens=[[t] for t in eos],
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
        )
        configured = model.spec.prompt_cache_bytes
        limit = DEFAULT_PROMPT_CACHE_BYTES if configured is None else configured
        self.prompt_cache = LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES, max_bytes=limit)
        self._cache_bytes = limit
        self._sequences: dict[int, _Sequence] = {}
        self._by_uid: dict[int, int] = {}
        self._seeded: deque[tuple[int, Job, bool]] = deque()
        self._alone: _Alone | None = None
        self._waiting: list[_Waiting] = []
        self._last_arrival = 0.0
        """``time.perf_counter()`` when the last job to wait arrived."""
        self._cancelled: dict[int, bool] = {}
        self._eos = frozenset(eos)
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        # a sequence can leave generate_step for the batch only if its cache can drop a token
        self._may_run_alone = can_trim_prompt_cache(make_prompt_cache(model.model))

    # ----- the engine protocol ----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a job has not ended."""
        return bool(
            self._sequences or self._seeded or self._cancelled or self._alone or self._waiting
        )

    def submit(self, tag: int, job: Job, stream: bool = False) -> None:
        """Plan the job and start it alone when nothing else runs; else it waits to join the
        batch with whatever arrives with it (a seeded job waits for its turn alone)."""
        if getattr(job.input, "seed", None) is not None:
            self._seeded.append((tag, job, stream))
            return
        plan = lm.plan_job(self.lm, job)
        if not plan.prompt:
            raise InvalidInput("the prompt is empty", field="input.prompt")
        params = plan.params
        seq = _Sequence(
            tag=tag,
            job=job,
            plan=plan,
            detokenizer=self.lm.tokenizer.detokenizer,
            stream=stream,
            cached_tokens=0,
            sampler=_sampler(params.temperature, params.top_p, params.min_p, params.top_k),
            processors=self._processors(params) + plan.constraints,
            stops=params.stop_sequences(),
        )
        seq.longest_stop = max((len(stop) for stop in seq.stops), default=0)
        alone = (
            self._may_run_alone
            and not self._sequences
            and self._alone is None
            and not self._seeded
            and not self._waiting
        )
        # generate_step shows logits processors only the tokens it processes: with a cached
        # prefix they would not see the whole prompt, as they do alone or in the batch
        cache, rest = (
            (None, plan.prompt) if alone and seq.processors else self._cached_prefix(plan.prompt)
        )
        seq.cached_tokens = len(plan.prompt) - len(rest)
        if alone:
            self._start_alone(seq, cache, rest)
            return
        self._waiting.append(_Waiting(seq, cache, rest))
        self._last_arrival = seq.submitted

    def cancel(self, tag: int, *, timed_out: bool = False) -> None:
        """End the job at the next step."""
        if (
            tag in self._sequences
            or (self._alone is not None and self._alone.seq.tag == tag)
            or any(t == tag for t, _, _ in self._seeded)
            or any(w.seq.tag == tag for w in self._waiting)
        ):
            self._cancelled[tag] = timed_out

    def step(self) -> list[Event]:
        """Cancel what was cancelled, let the waiting jobs join when it is time, then one step:
        of the sequence running alone, of the batch, or a seeded job, whole."""
        events = self._take_cancelled()
        if self._waiting and self._join_due():
            self._join()
        if self._alone is not None:
            return events + self._step_alone(self._alone)
        if not self._sequences and self._seeded:
            return events + self._run_seeded()
        if not self._sequences:
            return events
        self._size_prefill()
        _, responses = self._generator.next()  # type: ignore[no-untyped-call]
        width = len(responses)
        for response in responses:
            tag = self._by_uid.get(response.uid)
            if tag is None:
                continue
            seq = self._sequences[tag]
            seq.batch_peak = max(seq.batch_peak, width)
            events.extend(self._advance(seq, response))
        return events

    # ----- internals --------------------------------------------------------------------------

    def _join_due(self) -> bool:
        running = len(self._sequences) + (self._alone is not None)
        now = time.perf_counter()
        return (
            running == 0
            or running + len(self._waiting) >= self.max_batch
            or now - self._last_arrival >= JOIN_QUIET_S
            or now - self._waiting[0].seq.submitted >= JOIN_HOLD_S
        )

    def _join(self) -> None:
        """Every waiting job into the batch (after the one running alone, if any)."""
        self._to_batch_from_alone()
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            plan = w.seq.plan
            self._insert(
                w.seq, [w.rest], w.cache, plan.prompt[: w.seq.cached_tokens], plan.max_tokens
            )

    def _size_prefill(self) -> None:
        """Cut the next prefill pass's prompts into chunks that keep it within
        ``PREFILL_TOKENS``."""
        prompts = sum(1 for seq in self._sequences.values() if seq.first_token is None)
        low, high = _PREFILL_CHUNK_TOKENS
        chunk = max(low, min(high, PREFILL_TOKENS // max(1, prompts)))
        self._generator.prefill_step_size = chunk

    def _insert(
        self, seq: _Sequence, segments: list[list[int]], cache: Any, done: list[int], limit: int
    ) -> None:
        (uid,) = self._generator.insert_segments(
            [segments],
            max_tokens=[limit],
            caches=[cache],
            all_tokens=[done],
            samplers=[seq.sampler],
            logits_processors=[seq.processors],
        )
        seq.uid = uid
        self._sequences[seq.tag] = seq
        self._by_uid[uid] = seq.tag

    def _start_alone(self, seq: _Sequence, cache: Any, rest: list[int]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        cache = cache if cache is not None else make_prompt_cache(self.lm.model)
        steps = generate_step(
            mx.array(rest),
            self.lm.model,
            max_tokens=seq.plan.max_tokens,
            sampler=seq.sampler,
            logits_processors=seq.processors or None,
            prompt_cache=cache,
        )
        seq.batch_peak = 1
        self._alone = _Alone(seq=seq, steps=steps, cache=cache, rest=rest)

    def _to_batch_from_alone(self) -> None:
        """Move the sequence running alone into the batch, where it goes on from its last
        token (its cache less that token, which the batch feeds again)."""
        alone, self._alone = self._alone, None
        if alone is None:
            return
        seq = alone.seq
        alone.steps.close()
        plan = seq.plan
        if not seq.generated:  # it never ran a step: start it over in the batch
            done = plan.prompt[: seq.cached_tokens]
            self._insert(seq, [alone.rest], alone.cache if done else None, done, plan.max_tokens)
            return
        from mlx_lm.models.cache import trim_prompt_cache

        trim_prompt_cache(alone.cache, 1)
        last = seq.generated[-1]
        done = plan.prompt + seq.generated[:-1]
        self._insert(seq, [[last]], alone.cache, done, plan.max_tokens - len(seq.generated))

    def _step_alone(self, alone: _Alone) -> list[Event]:
        seq = alone.seq
        try:
            token, logprobs = next(alone.steps)
        except Exception as e:  # this job's failure only (the batch is empty)
            self._alone = None
            return [Event(seq.tag, "error", e)]
        if token in self._eos:
            finish: str | None = "stop"
        elif len(seq.generated) + 1 >= seq.plan.max_tokens:
            finish = "length"
        else:
            finish = None
        seq.generated.append(int(token))
        return self._advance(seq, _Response(int(token), logprobs, finish))

    def _processors(self, params: Any) -> list[Any]:
        from mlx_lm.sample_utils import make_logits_processors

        return list(make_logits_processors(repetition_penalty=params.repetition_penalty))

    def _cached_prefix(self, prompt: list[int]) -> tuple[Any, list[int]]:
        """(a KV cache of the longest cached prefix or None, the tokens still to process)."""
        if self._cache_bytes <= 0:
            return None, prompt
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self.prompt_cache.fetch_nearest_cache(_MODEL_KEY, prompt)
        if cache is not None and not rest:  # the whole prompt is cached: recompute the last token
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, list(rest)

    def _take_cancelled(self) -> list[Event]:
        events: list[Event] = []
        for tag, timed_out in list(self._cancelled.items()):
            del self._cancelled[tag]
            error: FusionError = (
                JobTimeout("the job ran past its timeout; it was removed from the batch")
                if timed_out
                else JobCancelled("the job was cancelled while running")
            )
            seq = self._sequences.pop(tag, None)
            if seq is not None and seq.uid is not None:
                self._generator.remove([seq.uid])  # type: ignore[no-untyped-call]
                self._by_uid.pop(seq.uid, None)
            if self._alone is not None and self._alone.seq.tag == tag:
                self._alone.steps.close()
                self._alone = None
            self._seeded = deque(s for s in self._seeded if s[0] != tag)
            self._waiting = [w for w in self._waiting if w.seq.tag != tag]
            events.append(Event(tag, "error", error))
        return events

    def _run_seeded(self) -> list[Event]:
        tag, job, _ = self._seeded.popleft()
        try:
            return [Event(tag, "done", lm.run(self.lm, job))]
        except Exception as e:
            return [Event(tag, "error", e)]

    def _advance(self, seq: _Sequence, response: Any) -> list[Event]:
        now = time.perf_counter()
        if seq.first_token is None:
            seq.first_token = now
        seq.tokens += 1
        finish = response.finish_reason
        if finish != "stop":  # "stop": an end-of-sequence token, which is not text
            if seq.plan.top_logprobs is not None:
                seq.logprobs.append(lm._token_logprob(response, seq.plan.top_logprobs))
            seq.detokenizer.add_token(int(response.token))
        if finish is not None:
            seq.detokenizer.finalize()
        longest = seq.longest_stop
        search_from = max(0, len(seq.text) - longest)
        seq.text += seq.detokenizer.last_segment
        stopped_by = None
        if seq.stops:
            cut, stopped_by = lm.earliest_stop(seq.text, seq.stops, search_from)
            if stopped_by is not None:
                if seq.logprobs:
                    seq.logprobs = lm._logprobs_of_text(
                        self.lm, seq.logprobs, seq.text[:cut], seq.text
                    )
                seq.text = seq.text[:cut]
                finish = "stop"
                if response.finish_reason is None and response.uid is not None:
                    self._generator.remove([response.uid])  # type: ignore[no-untyped-call]
        events: list[Event] = []
        if seq.stream:
            hold = 0 if finish is not None else max(0, longest - 1)
            upto = max(seq.sent, len(seq.text) - hold)
            if upto > seq.sent:
                piece = seq.text[seq.sent : upto]
                seq.sent = upto
                events.append(Event(seq.tag, "token", {"text": piece, "produced_at": time.time()}))
        if finish is None:
            return events
        self._finish_cache(seq, response)
        self._sequences.pop(seq.tag, None)
        if response.uid is not None:
            self._by_uid.pop(response.uid, None)
        gen = lm.Generation(
            text=seq.text,
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=len(seq.plan.prompt),
            completion_tokens=seq.tokens,
            inference_ms=round((now - seq.submitted) * 1000, 3),
            tokens_per_s=round(seq.tokens / max(now - (seq.first_token or now), 1e-9), 3)
            if seq.tokens > 1
            else 0.0,
            stop_sequence=stopped_by,
            logprobs=seq.logprobs if seq.plan.top_logprobs is not None else None,
        )
        try:
            result = lm.job_result(self.lm, seq.job, seq.plan, gen)
        except Exception as e:
            return [*events, Event(seq.tag, "error", e)]
        metrics = {
            **gen.metrics(),
            "time_to_first_token_ms": round(((seq.first_token or now) - seq.submitted) * 1000, 3),
            "cached_prompt_tokens": seq.cached_tokens,
            "batch_size": seq.batch_peak,
        }
        return [*events, Event(seq.tag, "done", (result, metrics))]

    def _finish_cache(self, seq: _Sequence, response: Any) -> None:
        """Keep the finished sequence's KV cache for later prompts that share its prefix."""
        cache, tokens = response.prompt_cache, response.all_tokens
        alone = self._alone
        if alone is not None and alone.seq is seq:  # its cache holds every token it produced
            self._alone = None
            alone.steps.close()
            cache, tokens = alone.cache, seq.plan.prompt + seq.generated
        if self._cache_bytes <= 0:
            return
        if cache is None:  # cut by a stop sequence while still in the batch: nothing to keep
            return
        self.prompt_cache.insert_cache(_MODEL_KEY, list(tokens), cache)
        self.prompt_cache.trim_to(n_bytes=self._cache_bytes)
