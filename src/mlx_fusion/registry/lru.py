"""The model registry: loaded models as an LRU bounded by count and bytes.

- A job **leases** its model for its whole length; a leased model is never evicted.
- The first lease of a model loads it; concurrent first leases share that one load.
- Before a load, idle models are evicted least recently used first until the model fits the
  count limit and the byte budget (estimated from weight files, then measured). A model that
  cannot fit even alone fails with ``model_too_large``; one that cannot fit because the others
  are in use waits up to ``capacity_wait_s``, then fails with ``no_capacity``.
- Idle models unload after their keep-alive (-1 never, 0 right after the job); pinned models load
  at start and are never evicted; failed loads back off exponentially per model.
- A model whose process dies is forgotten, and its job fails with ``model_crashed``.

Each model runs in a ``ModelHandle`` (its own process, or in-process for debugging); every
decision is made under one condition variable, and every eviction is logged with its reason.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from mlx_fusion.config import Settings
from mlx_fusion.defaults import REAP_INTERVAL_S, STOP_GRACE_S
from mlx_fusion.errors import (
    FusionError,
    JobTimeout,
    ModelCrashed,
    ModelKindMismatch,
    ModelLoadError,
    ModelTooLarge,
    NoCapacity,
    OutOfMemory,
)
from mlx_fusion.jobs.blobs import BlobWriter
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.registry.budget import budget_bytes, estimate_bytes
from mlx_fusion.registry.catalog import Catalog, ModelKind, ModelSpec
from mlx_fusion.registry.kinds import KINDS, KindModule
from mlx_fusion.registry.multiplex import Request, TokenCallback
from mlx_fusion.registry.process import InProcessModel, MemoryReport, ModelHandle, ModelProcess

log = structlog.get_logger(__name__)

HandleFactory = Callable[[ModelSpec, str], ModelHandle]
MAX_EVICTION_LOG = 100


class RegistryEvents(Protocol):
    """What the registry reports as it happens (the worker's metrics implement it). Called with
    the registry's lock held: keep them quick."""

    def model_loaded(self, model: str, load_s: float, memory: MemoryReport) -> None: ...

    def model_memory(self, model: str, memory: MemoryReport) -> None: ...

    def model_unloaded(self, model: str, cause: str) -> None: ...

    def model_load_failed(self, model: str) -> None: ...


class _NoEvents:
    def model_loaded(self, model: str, load_s: float, memory: MemoryReport) -> None:
        pass

    def model_memory(self, model: str, memory: MemoryReport) -> None:
        pass

    def model_unloaded(self, model: str, cause: str) -> None:
        pass

    def model_load_failed(self, model: str) -> None:
        pass


def _now_iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat()


@dataclass
class _Entry:
    spec: ModelSpec
    estimate_bytes: int
    handle: ModelHandle | None = None
    ready: bool = False
    measured_bytes: int | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = field(default_factory=time.time)
    load_ms: float = 0.0
    hits: int = 0
    unload_requested: bool = False

    @property
    def size_bytes(self) -> int:
        return self.measured_bytes if self.measured_bytes is not None else self.estimate_bytes

    def idle(self) -> bool:
        return self.ready and self.in_use == 0


@dataclass
class _Failure:
    count: int
    until: float
    reason: str


@dataclass(frozen=True)
class Lease:
    """A loaded model held for the length of one job."""

    spec: ModelSpec
    load_ms: float
    """Time this job spent waiting for the load (0.0 when the model was already loaded)."""
    _registry: ModelRegistry
    _entry: _Entry
    _request: Request = field(default_factory=Request)

    def run(
        self,
        job: Job,
        timeout_s: float | None = None,
        on_token: TokenCallback | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run the job on the leased model: (OpenAI result, metrics). ``on_token`` gets the
        pieces of a streamed job as the model produces them."""
        self._request.stream = on_token is not None
        self._request.on_token = on_token
        return self._registry._run(self._entry, job, timeout_s, self._request)

    def cancel(self) -> None:
        """Ask this lease's job to stop at its next check."""
        if self._entry.handle is not None:
            self._entry.handle.cancel(self._request)

    def kill(self) -> None:
        """End this lease's job by force (its model process is killed, with every job in it)."""
        if self._entry.handle is not None:
            self._entry.handle.kill(self._request)


class ModelRegistry:
    """Loaded models within a count limit and a memory budget (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        *,
        kinds: Mapping[ModelKind, KindModule] = KINDS,
        handle_factory: HandleFactory | None = None,
        events: RegistryEvents | None = None,
    ) -> None:
        self.catalog = catalog
        self.events: RegistryEvents = events or _NoEvents()
        self.waiting_models: Callable[[], frozenset[str]] = frozenset
        """Models that jobs waiting in the queues name (the worker's scheduler): evicted last."""
        """Told of loads, unloads (with their cause), load failures and memory readings."""
        self.settings = settings
        self._kinds = kinds
        self._factory = handle_factory or self._default_factory
        self._entries: dict[str, _Entry] = {}
        self._failures: dict[str, _Failure] = {}
        self._sizes: dict[str, int] = {}
        self._load_s: dict[str, float] = {}
        self._cond = threading.Condition()
        self._budget = budget_bytes(
            settings.memory_budget_bytes, settings.memory_budget_fraction, None
        )
        self._device_known = settings.memory_budget_bytes is not None
        self._stats = collections.Counter[str]()
        self._evictions: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_EVICTION_LOG
        )
        self._reaper: threading.Thread | None = None
        self._closing = threading.Event()

    def _default_factory(self, spec: ModelSpec, kind_module: str) -> ModelHandle:
        # a prepared job may carry a referenced file inline, base64: beyond the document limit
        limit = self.settings.max_input_bytes + 3 * self.settings.max_file_bytes
        if self.settings.registry_mode != "process":
            return InProcessModel(spec, kind_module, max_input_bytes=limit)
        return ModelProcess(
            spec, kind_module, max_input_bytes=limit, max_batch=self.batch_limit(spec)
        )

    def batch_limit(self, spec: ModelSpec) -> int:
        """How many jobs ``spec``'s model runs at once in one batch: its catalog
        ``max_batch_size``, else ``Settings.max_batch_size``, for a kind with a batch engine
        in a model process; 1 otherwise."""
        kind = self._kinds.get(spec.kind)
        if self.settings.registry_mode != "process" or not hasattr(kind, "BatchEngine"):
            return 1
        return spec.max_batch_size or self.settings.max_batch_size

    def concurrency(self, spec: ModelSpec) -> int:
        """How many leases of ``spec``'s model may run jobs at the same time."""
        return max(spec.max_concurrent_jobs, self.batch_limit(spec))

    # ----- resolving ---------------------------------------------------------------------

    def resolve(self, name: str, job_kind: Kind) -> ModelSpec:
        """The catalog entry a job names, checked against the job's kind."""
        spec = self.catalog.resolve(name)
        kind = self._kinds.get(spec.kind)
        if kind is None or job_kind not in kind.JOB_KINDS:
            raise ModelKindMismatch(
                f"model {spec.id!r} (kind {spec.kind.value!r}) cannot run {job_kind.value!r} jobs",
                field="model",
            )
        return spec

    def prepare(self, spec: ModelSpec, job: Job) -> Job:
        """The job as its model process will get it: the kind's ``prepare`` hook, if it has one,
        resolves what the job references (files under the input folder) in this process."""
        hook = getattr(self._kinds.get(spec.kind), "prepare", None)
        return job if hook is None else hook(job, self.settings)

    def finish(
        self, spec: ModelSpec, job: Job, result: dict[str, Any], put: BlobWriter
    ) -> dict[str, Any]:
        """The result as the job record keeps it: the kind's ``finish`` hook, if it has one, moves
        binary outputs (images) from the model process's reply into the blob store."""
        hook = getattr(self._kinds.get(spec.kind), "finish", None)
        return result if hook is None else hook(job, result, put)

    def _kind_module(self, spec: ModelSpec) -> str:
        kind = self._kinds.get(spec.kind)
        if kind is None:
            raise ModelLoadError(f"model {spec.id!r}: no runner for kind {spec.kind.value!r}")
        return str(getattr(kind, "__name__", type(kind).__module__))

    # ----- leasing -----------------------------------------------------------------------

    @contextmanager
    def lease(self, spec: ModelSpec, *, wait_s: float | None = None) -> Iterator[Lease]:
        """Hold ``spec``'s model for one job, loading it (once) if needed."""
        started = time.monotonic()
        entry, must_load = self._acquire(spec, wait_s)
        if must_load:
            self._load(entry)
        load_ms = round((time.monotonic() - started) * 1000, 3) if must_load else 0.0
        try:
            yield Lease(spec=spec, load_ms=load_ms, _registry=self, _entry=entry)
        finally:
            self._release(entry)

    def _deadline(self, wait_s: float | None) -> float:
        return time.monotonic() + (self.settings.capacity_wait_s if wait_s is None else wait_s)

    def _wait(self, deadline: float, why: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoCapacity(why)
        self._cond.wait(remaining)

    def _acquire(self, spec: ModelSpec, wait_s: float | None) -> tuple[_Entry, bool]:
        deadline = self._deadline(wait_s)
        with self._cond:
            while True:
                entry = self._entries.get(spec.id)
                if entry is not None and entry.ready and not self._alive(entry):
                    self._forget(entry, reason="process died while idle")
                    continue
                if entry is not None:
                    if entry.ready and entry.in_use < self.concurrency(spec):
                        entry.in_use += 1
                        entry.hits += 1
                        self._stats["hits"] += 1
                        return entry, False
                    self._wait(deadline, f"model {spec.id!r} stayed busy")
                    continue
                self._check_cooldown(spec)
                need = self._sizes.get(spec.id) or estimate_bytes(spec.model_dir)
                if need > self._budget:
                    raise ModelTooLarge(
                        f"model {spec.id!r} needs {need} bytes; the budget is {self._budget}"
                    )
                if not self._make_room(need, for_model=spec.id):
                    self._wait(
                        deadline,
                        f"no room for model {spec.id!r} ({need} bytes): the loaded models are "
                        f"in use ({self._used_bytes()} of {self._budget} bytes)",
                    )
                    continue
                entry = _Entry(spec=spec, estimate_bytes=need, in_use=1)
                self._entries[spec.id] = entry
                self._stats["misses"] += 1
                return entry, True

    def _load(self, entry: _Entry) -> None:
        spec = entry.spec
        try:
            self._start(entry)
        except BaseException as e:
            with self._cond:
                self._entries.pop(spec.id, None)
                if isinstance(e, ModelLoadError | OutOfMemory):  # not a job's own timeout
                    self._record_failure(spec, e)
                self._cond.notify_all()
            raise
        with self._cond:
            self._failures.pop(spec.id, None)
            entry.ready = True
            self._stats["loads"] += 1
            over = self._used_bytes() - self._budget
            if over > 0 and not self._make_room(0, for_model=spec.id, exclude=entry):
                entry.in_use = 0
                self._unload(
                    entry, reason="over budget after load", cause="over_budget", for_model=spec.id
                )
                raise NoCapacity(
                    f"model {spec.id!r} measured {entry.size_bytes} bytes; the models in use "
                    f"leave no room in the budget of {self._budget} bytes"
                )
            self._cond.notify_all()

    def _start(self, entry: _Entry) -> None:
        spec = entry.spec
        for attempt in (1, 2):
            handle = self._factory(spec, self._kind_module(spec))
            try:
                report = handle.start(self.settings.load_timeout_s)
            except OutOfMemory:
                handle.stop(STOP_GRACE_S)
                if attempt == 2 or not self._evict_idle(for_model=spec.id):
                    raise
                continue
            except ModelCrashed as e:
                handle.stop(STOP_GRACE_S)
                raise ModelLoadError(f"model {spec.id!r}: process died while loading: {e}") from e
            except BaseException:
                handle.stop(STOP_GRACE_S)
                raise
            with self._cond:
                entry.handle = handle
                entry.load_ms = report.load_ms
                self._load_s[spec.id] = report.load_ms / 1000
                entry.loaded_at = time.time()
                self._measure(entry, report.memory.active_bytes)  # resident after the load
                self.events.model_loaded(spec.id, report.load_ms / 1000, report.memory)
                if not self._device_known:
                    self._device_known = True
                    self._budget = budget_bytes(
                        None, self.settings.memory_budget_fraction, report.device
                    )
            log.info(
                "model_loaded",
                model=spec.id,
                load_ms=report.load_ms,
                bytes=entry.size_bytes,
                estimate_bytes=entry.estimate_bytes,
                budget_bytes=self._budget,
                pid=handle.pid,
            )
            return

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.in_use = max(0, entry.in_use - 1)
            entry.last_used = time.monotonic()
            if entry.in_use == 0 and entry.ready and self._entries.get(entry.spec.id) is entry:
                if entry.unload_requested:
                    self._unload(entry, reason="unload requested", cause="requested")
                elif not entry.spec.pinned and self._keep_alive(entry.spec) == 0:
                    self._unload(entry, reason="keep_alive_s=0", cause="keep_alive")
            self._cond.notify_all()

    # ----- running -----------------------------------------------------------------------

    def _run(
        self, entry: _Entry, job: Job, timeout_s: float | None, request: Request
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        document = job.spec.to_document()
        for attempt in (1, 2):
            handle = entry.handle
            assert handle is not None
            try:
                result, metrics, memory = handle.run(document, timeout_s, request)
            except OutOfMemory:
                if attempt == 2 or not self._evict_idle(for_model=entry.spec.id):
                    raise
                continue
            except BaseException as e:
                if not handle.alive:  # crashed, killed, timed out: this process is gone
                    with self._cond:
                        cause = "timeout" if isinstance(e, JobTimeout) else "crashed"
                        self._forget(entry, reason=f"{type(e).__name__} during a job", cause=cause)
                raise
            with self._cond:
                self._measure(entry, memory.peak_bytes)  # weights plus the job's working memory
                self.events.model_memory(entry.spec.id, memory)
            return result, metrics
        raise AssertionError("unreachable")

    # ----- memory and eviction (call with the lock held) ------------------------------------

    def _measure(self, entry: _Entry, measured: int) -> None:
        if measured > 0:
            entry.measured_bytes = max(measured, entry.measured_bytes or 0)
            self._sizes[entry.spec.id] = entry.measured_bytes

    def _used_bytes(self) -> int:
        return sum(e.size_bytes for e in self._entries.values())

    def _keep_alive(self, spec: ModelSpec) -> float:
        return spec.keep_alive_s if spec.keep_alive_s is not None else self.settings.keep_alive_s

    def _evictable(self, exclude: _Entry | None = None) -> list[_Entry]:
        idle = [
            e for e in self._entries.values() if e.idle() and not e.spec.pinned and e is not exclude
        ]
        waiting = self.waiting_models()
        return sorted(idle, key=lambda e: (e.spec.id in waiting, e.last_used))

    def _make_room(self, need: int, *, for_model: str, exclude: _Entry | None = None) -> bool:
        """Evict idle models, least recently used first, until ``need`` more bytes and one more
        model fit; False (nothing evicted beyond what helped) if the rest are in use or pinned."""
        extra = 1 if exclude is None else 0
        candidates = self._evictable(exclude)
        while (
            len(self._entries) + extra > self.settings.max_loaded_models
            or self._used_bytes() + need > self._budget
        ):
            if not candidates:
                return False
            self._unload(candidates.pop(0), reason="lru", cause="lru", for_model=for_model)
        return True

    def _evict_idle(self, *, for_model: str) -> bool:
        with self._cond:
            victims = self._evictable(self._entries.get(for_model))
            for victim in victims:
                self._unload(
                    victim, reason="out of memory", cause="out_of_memory", for_model=for_model
                )
            return bool(victims)

    def _unload(
        self, entry: _Entry, *, reason: str, cause: str, for_model: str | None = None
    ) -> None:
        self._entries.pop(entry.spec.id, None)
        if entry.handle is not None:
            entry.handle.stop(STOP_GRACE_S)
        record = {
            "model": entry.spec.id,
            "reason": reason,
            "cause": cause,
            "for_model": for_model,
            "bytes": entry.size_bytes,
            "budget_bytes": self._budget,
            "used_bytes_after": self._used_bytes(),
            "at": _now_iso(time.time()),
        }
        self._evictions.append(record)
        self._stats["evictions" if for_model else "unloads"] += 1
        self.events.model_unloaded(entry.spec.id, cause)
        log.info("model_evicted" if for_model else "model_unloaded", **record)
        self._cond.notify_all()

    def _forget(self, entry: _Entry, *, reason: str, cause: str = "crashed") -> None:
        if self._entries.get(entry.spec.id) is entry:
            self._stats["crashes"] += 1
            self._unload(entry, reason=reason, cause=cause)

    def _alive(self, entry: _Entry) -> bool:
        return entry.handle is not None and entry.handle.alive

    # ----- load failures ---------------------------------------------------------------------

    def _record_failure(self, spec: ModelSpec, error: FusionError) -> None:
        previous = self._failures.get(spec.id)
        count = previous.count + 1 if previous else 1
        delay = min(
            self.settings.load_cooldown_s * 2 ** (count - 1), self.settings.load_cooldown_max_s
        )
        self._failures[spec.id] = _Failure(count, time.monotonic() + delay, error.message)
        self._stats["load_failures"] += 1
        self.events.model_load_failed(spec.id)
        log.warning(
            "model_load_failed",
            model=spec.id,
            error=error.message,
            failures=count,
            retry_in_s=delay,
        )

    def _check_cooldown(self, spec: ModelSpec) -> None:
        failure = self._failures.get(spec.id)
        if failure is None:
            return
        wait = failure.until - time.monotonic()
        if wait > 0:
            raise ModelLoadError(
                f"model {spec.id!r} failed to load {failure.count} time(s); next try in "
                f"{wait:.1f} s; last error: {failure.reason}"
            )

    # ----- lifetimes and operations ----------------------------------------------------------

    def load(self, model_id: str) -> None:
        """Load a catalog model now (if it is not loaded), as a lease that ends at once."""
        spec = self.catalog.resolve(model_id)
        with self.lease(spec):
            pass

    def unload(self, model_id: str) -> bool:
        """Unload a model now, or when its last lease ends; False if it is not loaded."""
        spec = self.catalog.resolve(model_id)
        with self._cond:
            entry = self._entries.get(spec.id)
            if entry is None:
                return False
            if entry.idle():
                self._unload(entry, reason="unload requested", cause="requested")
            else:
                entry.unload_requested = True
            return True

    def active_leases(self) -> int:
        """How many leases are held now."""
        with self._cond:
            return sum(e.in_use for e in self._entries.values())

    def reap(self) -> None:
        """Unload models idle past their keep-alive, and forget dead idle processes."""
        now = time.monotonic()
        with self._cond:
            for entry in list(self._entries.values()):
                if not entry.idle():
                    continue
                if not self._alive(entry):
                    self._forget(entry, reason="process died while idle")
                    continue
                keep = self._keep_alive(entry.spec)
                if not entry.spec.pinned and keep >= 0 and now - entry.last_used >= keep:
                    self._unload(entry, reason=f"idle for {keep:g} s", cause="idle")

    def start_reaper(self, interval_s: float = REAP_INTERVAL_S) -> None:
        """Run ``reap`` in a daemon thread until ``close``."""

        def loop() -> None:
            while not self._closing.wait(interval_s):
                try:
                    self.reap()
                except Exception as e:  # the reaper must outlive any one bad stop
                    log.warning("reaper_failed", error=str(e))

        self._reaper = threading.Thread(target=loop, name="fusion-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        """Stop the reaper and every model process."""
        self._closing.set()
        if self._reaper is not None:
            self._reaper.join()
        with self._cond:
            for entry in list(self._entries.values()):
                self._unload(entry, reason="worker stopping", cause="shutdown")

    def load_seconds(self, model_id: str, default: float) -> float:
        """How long the last load of ``model_id`` took here, or ``default`` if it never
        loaded."""
        with self._cond:
            return self._load_s.get(model_id, default)

    def loaded(self) -> list[str]:
        """Ids of the models loaded now."""
        with self._cond:
            return [e.spec.id for e in self._entries.values() if e.ready]

    def snapshot(self) -> dict[str, Any]:
        """Loaded models, sizes, budget, counters and recent evictions (JSON-able)."""
        now_mono, now_wall = time.monotonic(), time.time()
        with self._cond:
            models = [
                {
                    "id": e.spec.id,
                    "kind": e.spec.kind.value,
                    "state": "ready" if e.ready else "loading",
                    "bytes": e.size_bytes,
                    "measured_bytes": e.measured_bytes,
                    "estimate_bytes": e.estimate_bytes,
                    "in_use": e.in_use,
                    "pinned": e.spec.pinned,
                    "keep_alive_s": self._keep_alive(e.spec),
                    "last_used_at": _now_iso(now_wall - (now_mono - e.last_used)),
                    "loaded_at": _now_iso(e.loaded_at),
                    "load_ms": e.load_ms,
                    "hits": e.hits,
                    "pid": e.handle.pid if e.handle else None,
                }
                for e in self._entries.values()
            ]
            cooldowns = {
                model_id: {
                    "failures": f.count,
                    "retry_in_s": round(max(0.0, f.until - now_mono), 3),
                    "reason": f.reason,
                }
                for model_id, f in self._failures.items()
            }
            return {
                "mode": self.settings.registry_mode,
                "budget_bytes": self._budget,
                "used_bytes": self._used_bytes(),
                "max_loaded_models": self.settings.max_loaded_models,
                "models": models,
                "stats": {
                    k: self._stats[k]
                    for k in (
                        "hits",
                        "misses",
                        "loads",
                        "load_failures",
                        "evictions",
                        "unloads",
                        "crashes",
                    )
                },
                "evictions": list(self._evictions),
                "cooldowns": cooldowns,
            }
