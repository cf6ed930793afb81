"""The model registry with several tiny random-weight models, each in its own process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crash_kind
import psutil
import pytest
import slow_kind
from conftest import write_catalog

from mlx_fusion.config import Settings
from mlx_fusion.errors import (
    ModelCrashed,
    ModelLoadError,
    ModelTooLarge,
    NoCapacity,
    OutOfMemory,
)
from mlx_fusion.jobs import parse_job
from mlx_fusion.registry import Catalog, ModelKind, ModelRegistry

NAMES = ("a", "b", "c")


@pytest.fixture(scope="session")
def model_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("several")
    dirs = {}
    for name in NAMES:
        dirs[name] = root / name
        shutil.copytree(tiny_model_dir, dirs[name])
    return dirs


@pytest.fixture
def make_registry(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> Iterator[Callable[..., ModelRegistry]]:
    """A registry over models a, b, c (catalog entry overrides per model), closed at the end."""
    built: list[ModelRegistry] = []

    def build(
        entries: dict[str, dict[str, Any]] | None = None, kinds: Any = None, **settings: Any
    ) -> ModelRegistry:
        models: dict[str, dict[str, Any]] = {
            n: {"kind": "lm", "path": model_dirs[n]} for n in NAMES
        }
        for name, extra in (entries or {}).items():
            models.setdefault(name, {"kind": "lm"}).update(extra)
        catalog = Catalog.load(write_catalog(tmp_path / f"models{len(built)}.toml", models))
        s = Settings(_env_file=None, **{"capacity_wait_s": 0.3, **settings})  # type: ignore[call-arg]
        registry = ModelRegistry(catalog, s, kinds=kinds) if kinds else ModelRegistry(catalog, s)
        built.append(registry)
        return registry

    yield build
    for registry in built:
        registry.close()


def job(model: str, **metadata: str) -> Any:
    return parse_job(
        {
            "id": f"j-{model}-{time.monotonic_ns()}",
            "kind": "completion",
            "model": model,
            "input": {"prompt": "the cat", "max_tokens": 2},
            "metadata": metadata,
        },
        max_input_bytes=100_000,
    )


def use(registry: ModelRegistry, name: str) -> dict[str, Any]:
    with registry.lease(registry.catalog.resolve(name)) as lease:
        result, _ = lease.run(job(name))
    return result


def loaded(registry: ModelRegistry) -> set[str]:
    return set(registry.loaded())


def within_budget(registry: ModelRegistry) -> None:
    snap = registry.snapshot()
    assert all(m["measured_bytes"] for m in snap["models"] if m["state"] == "ready")
    assert snap["used_bytes"] <= snap["budget_bytes"], snap


def test_count_limit_evicts_the_least_recently_used(make_registry: Any) -> None:
    registry = make_registry(max_loaded_models=2)
    use(registry, "a")
    use(registry, "b")
    use(registry, "a")  # b is now the least recently used
    use(registry, "c")
    assert loaded(registry) == {"a", "c"}
    eviction = registry.snapshot()["evictions"][-1]
    assert eviction["model"] == "b" and eviction["reason"] == "lru"
    assert eviction["for_model"] == "c"


def test_byte_budget_evicts_lru_and_is_never_exceeded(make_registry: Any) -> None:
    probe = make_registry()
    use(probe, "a")
    size = probe.snapshot()["models"][0]["measured_bytes"]
    assert size > 0
    probe.close()
    registry = make_registry(memory_budget_bytes=int(size * 2.5), max_loaded_models=10)
    for name in ("a", "b"):
        use(registry, name)
        within_budget(registry)
    use(registry, "a")
    use(registry, "c")
    within_budget(registry)
    assert loaded(registry) == {"a", "c"}


def test_leased_model_is_never_evicted_and_the_newcomer_fails(make_registry: Any) -> None:
    registry = make_registry(max_loaded_models=1)
    with registry.lease(registry.catalog.resolve("a")):
        with pytest.raises(NoCapacity) as e, registry.lease(registry.catalog.resolve("b")):
            pass
        assert e.value.code == "no_capacity"
        assert loaded(registry) == {"a"}


def test_a_job_waits_for_a_lease_to_end_then_evicts(make_registry: Any) -> None:
    registry = make_registry(max_loaded_models=1, capacity_wait_s=20)
    lease_a = registry.lease(registry.catalog.resolve("a"))
    lease_a.__enter__()
    threading.Timer(1.0, lambda: lease_a.__exit__(None, None, None)).start()
    started = time.monotonic()
    use(registry, "b")
    assert time.monotonic() - started >= 0.9
    assert loaded(registry) == {"b"}


def test_model_too_large_fails_without_evicting(make_registry: Any) -> None:
    registry = make_registry(memory_budget_bytes=1000)
    with pytest.raises(ModelTooLarge) as e:
        use(registry, "a")
    assert e.value.code == "model_too_large" and "1000" in e.value.message


def test_concurrent_first_requests_share_one_load(make_registry: Any) -> None:
    registry = make_registry(capacity_wait_s=60)
    spec = registry.catalog.resolve("a")
    errors: list[BaseException] = []

    def first_request() -> None:
        try:
            with registry.lease(spec):
                time.sleep(0.05)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=first_request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = registry.snapshot()["stats"]
    assert stats["loads"] == 1 and stats["misses"] == 1 and stats["hits"] == 3


def test_idle_model_unloads_after_its_keep_alive(make_registry: Any) -> None:
    registry = make_registry({"a": {"keep_alive_s": 0.5}})
    registry.start_reaper(0.1)
    use(registry, "b")  # default keep-alive (300 s): stays
    use(registry, "a")
    assert loaded(registry) == {"a", "b"}
    time.sleep(1.2)
    assert loaded(registry) == {"b"}
    assert registry.snapshot()["evictions"][-1]["reason"].startswith("idle for 0.5")


def test_keep_alive_zero_unloads_right_after_the_job(make_registry: Any) -> None:
    registry = make_registry({"a": {"keep_alive_s": 0}})
    use(registry, "a")
    assert loaded(registry) == set()


def test_pinned_model_survives_pressure_and_idle(make_registry: Any) -> None:
    registry = make_registry({"a": {"pinned": True, "keep_alive_s": 0}}, max_loaded_models=2)
    registry.load("a")
    use(registry, "a")
    registry.start_reaper(0.1)
    use(registry, "b")
    use(registry, "c")
    time.sleep(0.3)
    assert loaded(registry) == {"a", "c"}


def test_load_failure_backs_off_and_a_fix_is_picked_up(
    make_registry: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    registry = make_registry({"bad": {"path": broken}}, load_cooldown_s=1.0)
    with pytest.raises(ModelLoadError) as first:
        use(registry, "bad")
    assert first.value.code == "model_load_failed"
    with pytest.raises(ModelLoadError) as second:
        use(registry, "bad")
    assert "next try in" in second.value.message and "failed to load 1 time" in second.value.message
    assert registry.snapshot()["stats"]["load_failures"] == 1  # no second attempt yet
    assert registry.snapshot()["cooldowns"]["bad"]["reason"] == first.value.message
    shutil.copy(tiny_model_dir / "model.safetensors", broken / "model.safetensors")
    time.sleep(1.1)
    assert use(registry, "bad")["object"] == "text_completion"
    assert "bad" not in registry.snapshot()["cooldowns"]


def test_missing_files_report_the_reason(make_registry: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    registry = make_registry({"gone": {"path": empty}})
    with pytest.raises(ModelLoadError) as e:
        use(registry, "gone")
    assert "config.json" in e.value.message or "gone" in e.value.message


def test_killed_model_process_fails_the_job_then_reloads(make_registry: Any) -> None:
    registry = make_registry(kinds={ModelKind.LM: slow_kind})
    spec = registry.catalog.resolve("a")

    def kill_when_busy() -> None:
        for _ in range(200):
            models = registry.snapshot()["models"]
            if models and models[0]["in_use"] and models[0]["pid"]:
                time.sleep(0.3)
                os.kill(models[0]["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    started = time.monotonic()
    with pytest.raises(ModelCrashed) as e, registry.lease(spec) as lease:
        lease.run(job("a", sleep_s="30"))
    killer.join()
    assert e.value.code == "model_crashed" and time.monotonic() - started < 20
    assert loaded(registry) == set()
    assert use(registry, "a")["object"] == "text_completion"
    assert registry.snapshot()["stats"]["loads"] == 2


def _rss_tree() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


def test_unload_gives_the_memory_back(make_registry: Any) -> None:
    registry = make_registry()
    before = _rss_tree()
    use(registry, "a")
    during = _rss_tree()
    assert during > before * 1.2  # the model process holds real memory
    assert registry.unload("a")
    after = _rss_tree()
    assert after <= before * 1.10, (before, during, after)


def test_unload_of_a_model_in_use_waits_for_its_lease(make_registry: Any) -> None:
    registry = make_registry()
    with registry.lease(registry.catalog.resolve("a")) as lease:
        assert registry.unload("a")
        lease.run(job("a"))  # still there, the job goes on
        assert loaded(registry) == {"a"}
    assert loaded(registry) == set()


def test_in_process_mode_runs_jobs_in_this_process(make_registry: Any) -> None:
    registry = make_registry(registry_mode="inprocess")
    assert use(registry, "a")["object"] == "text_completion"
    assert registry.snapshot()["models"][0]["pid"] in (None, os.getpid())


def test_out_of_memory_at_load_evicts_idle_models_and_retries_once(
    make_registry: Any, tiny_model_dir: Path
) -> None:
    registry = make_registry(
        {"oom-load": {"path": tiny_model_dir}}, kinds={ModelKind.LM: crash_kind}
    )
    use(registry, "a")
    with pytest.raises(OutOfMemory) as e:
        use(registry, "oom-load")
    assert e.value.code == "out_of_memory"
    assert loaded(registry) == set()
    eviction = registry.snapshot()["evictions"][-1]
    assert eviction["model"] == "a" and eviction["reason"] == "out of memory"


def test_out_of_memory_in_a_job_evicts_idle_models_and_retries_once(make_registry: Any) -> None:
    registry = make_registry(kinds={ModelKind.LM: crash_kind})
    use(registry, "b")
    with pytest.raises(OutOfMemory), registry.lease(registry.catalog.resolve("a")) as lease:
        lease.run(job("a", action="oom"))
    assert loaded(registry) == {"a"}  # the model process survived its allocation error
    assert registry.snapshot()["evictions"][-1]["model"] == "b"


def test_quantize_at_load_shrinks_the_measured_size(
    make_registry: Any, model_dirs: dict[str, Path]
) -> None:
    registry = make_registry({"q": {"path": model_dirs["a"], "quantize_bits": 4}})
    registry.load("a")
    registry.load("q")
    sizes = {m["id"]: m["measured_bytes"] for m in registry.snapshot()["models"]}
    assert sizes["q"] < sizes["a"] / 2, sizes
    assert use(registry, "q")["object"] == "text_completion"
