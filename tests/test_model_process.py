"""Model processes: real spawned children, the tiny llama and stand-in kinds (slow_kind,
crash_kind), real signals. Nothing of mlx_fusion is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mlx_fusion.errors import (
    InferenceError,
    InvalidInput,
    JobTimeout,
    ModelCrashed,
    ModelLoadError,
    OutOfMemory,
)
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.process import (
    OOM_MARKERS,
    InProcessModel,
    ModelProcess,
    error_reply,
)

TESTS = Path(__file__).resolve().parent
LM = "mlx_fusion.registry.kinds.lm"
MAX_INPUT_BYTES = 1_000_000
CHAT_JOB: dict[str, Any] = {
    "id": "j1",
    "kind": "chat.completion",
    "model": "tiny-llama",
    "input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
}


def spec(model_id: str = "stand-in", path: Path = Path("/nonexistent")) -> ModelSpec:
    return ModelSpec(id=model_id, kind="lm", path=path)  # type: ignore[arg-type]


def job(action: str = "", **metadata: str) -> dict[str, Any]:
    return {
        "id": "j1",
        "kind": "completion",
        "model": "stand-in",
        "input": {"prompt": "x"},
        "metadata": {"action": action, **metadata},
    }


def gone(pid: int, within_s: float = 5.0) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaps counts as exited)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def started() -> Iterator[Callable[..., ModelProcess]]:
    """Start ModelProcess handles; every one is stopped at teardown."""
    handles: list[ModelProcess] = []

    def start(model: ModelSpec, kind_module: str = "crash_kind") -> ModelProcess:
        handle = ModelProcess(model, kind_module, max_input_bytes=MAX_INPUT_BYTES)
        handles.append(handle)
        handle.start(timeout_s=60)
        return handle

    yield start
    for handle in handles:
        handle.stop(grace_s=1.0)


def test_model_process_runs_chat_job_on_tiny_model(tiny_model_dir: Path) -> None:
    handle = ModelProcess(spec("tiny-llama", tiny_model_dir), LM, max_input_bytes=MAX_INPUT_BYTES)
    try:
        report = handle.start(timeout_s=60)
        result, metrics, memory = handle.run(CHAT_JOB, timeout_s=60)
    finally:
        handle.stop()
    assert report.memory.active_bytes > 0
    assert report.memory.rss_bytes > report.memory.active_bytes
    assert "device_name" in report.device
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["role"] == "assistant"
    assert result["usage"]["completion_tokens"] <= 3
    assert metrics["completion_tokens"] == result["usage"]["completion_tokens"]
    assert memory.active_bytes > 0
    assert memory.peak_bytes >= memory.active_bytes


_NO_MLX_SCRIPT = """
import json, sys
from pathlib import Path
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.process import ModelProcess
spec = ModelSpec(id="tiny-llama", kind="lm", path=Path(sys.argv[1]))
handle = ModelProcess(spec, "mlx_fusion.registry.kinds.lm", max_input_bytes=1_000_000)
handle.start(timeout_s=60)
result, _, memory = handle.run(json.loads(sys.argv[2]), timeout_s=60)
handle.stop()
mlx = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
print(json.dumps({"mlx": mlx, "object": result["object"], "active": memory.active_bytes}))
"""


def test_parent_process_never_imports_mlx(tiny_model_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_MLX_SCRIPT, str(tiny_model_dir), json.dumps(CHAT_JOB)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"mlx": [], "object": "chat.completion", "active": out["active"]}
    assert out["active"] > 0


def test_load_failure_raises_model_load_error_and_child_exits(tmp_path: Path) -> None:
    handle = ModelProcess(spec("empty", tmp_path), LM, max_input_bytes=MAX_INPUT_BYTES)
    with pytest.raises(ModelLoadError, match="model 'empty'") as info:
        handle.start(timeout_s=60)
    assert "config.json" in str(info.value) or "No such file" in str(info.value)
    assert handle.pid is not None and gone(handle.pid, 0.0)
    assert not handle.alive


def test_exception_in_load_becomes_model_load_error_with_its_type() -> None:
    handle = ModelProcess(spec("fail-load"), "crash_kind", max_input_bytes=MAX_INPUT_BYTES)
    with pytest.raises(ModelLoadError, match=r"model 'fail-load': ValueError: no weights here"):
        handle.start(timeout_s=60)
    assert handle.exitcode == 0


def test_allocation_failure_in_load_is_out_of_memory() -> None:
    handle = ModelProcess(spec("oom-load"), "crash_kind", max_input_bytes=MAX_INPUT_BYTES)
    with pytest.raises(OutOfMemory, match="Unable to allocate"):
        handle.start(timeout_s=60)


def test_child_dying_during_load_raises_model_crashed() -> None:
    handle = ModelProcess(spec("exit-load"), "crash_kind", max_input_bytes=MAX_INPUT_BYTES)
    with pytest.raises(ModelCrashed, match="exited with code 3 during the load"):
        handle.start(timeout_s=60)


def test_load_timeout_kills_child() -> None:
    handle = ModelProcess(spec("slow-load"), "crash_kind", max_input_bytes=MAX_INPUT_BYTES)
    began = time.monotonic()
    with pytest.raises(ModelLoadError, match="load timed out after 2 s"):
        handle.start(timeout_s=2)
    assert time.monotonic() - began < 5
    assert handle.pid is not None and gone(handle.pid, 0.0)


def test_sigkill_mid_job_raises_model_crashed_at_once(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec("slow"), "slow_kind")
    pid = handle.pid
    assert pid is not None
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    began = time.monotonic()
    with pytest.raises(ModelCrashed, match="killed by SIGKILL during the job"):
        handle.run({**job(), "metadata": {"sleep_s": "30"}})
    assert time.monotonic() - began < 3
    assert not handle.alive


def test_run_on_a_dead_handle_raises_model_crashed_immediately(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec())
    assert handle.pid is not None
    os.kill(handle.pid, signal.SIGKILL)
    assert gone(handle.pid)
    for _ in range(2):
        with pytest.raises(ModelCrashed):
            handle.run(job())
    assert not handle.alive


def test_run_timeout_raises_job_timeout_and_kills_child(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec())
    began = time.monotonic()
    with pytest.raises(JobTimeout, match=r"job ran past 0\.5 s"):
        handle.run(job("sleep", sleep_s="30"), timeout_s=0.5)
    assert time.monotonic() - began < 3
    assert handle.pid is not None and gone(handle.pid, 0.0)
    assert not handle.alive
    with pytest.raises(ModelCrashed):
        handle.run(job())


class _DeathPenalty(BaseException):
    """Like RQ's JobTimeoutException raised from its SIGALRM handler."""


def test_base_exception_while_waiting_kills_child_and_propagates(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec())

    def alarm(signum: int, frame: Any) -> None:
        raise _DeathPenalty

    previous = signal.signal(signal.SIGALRM, alarm)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, 0.5)
    began = time.monotonic()
    try:
        with pytest.raises(_DeathPenalty):
            handle.run(job("sleep", sleep_s="30"))
    finally:
        signal.signal(signal.SIGALRM, previous)
        if previous_timer[0] > 0:  # pytest-timeout's own alarm
            signal.setitimer(signal.ITIMER_REAL, *previous_timer)
    assert time.monotonic() - began < 3
    assert handle.pid is not None and gone(handle.pid, 0.0)
    assert not handle.alive


def test_stop_lets_an_idle_child_exit_cleanly_and_reaps_it(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec())
    pid = handle.pid
    assert pid is not None and handle.alive
    began = time.monotonic()
    handle.stop(grace_s=5)
    assert time.monotonic() - began < 2
    assert handle.exitcode == 0
    assert not psutil.pid_exists(pid)
    assert not handle.alive
    handle.stop()  # idempotent


def test_stop_kills_a_busy_child_that_ignores_sigterm(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec("stubborn"))
    errors: list[BaseException] = []

    def busy() -> None:
        try:
            handle.run(job("sleep", sleep_s="30"))
        except BaseException as e:
            errors.append(e)

    runner = threading.Thread(target=busy)
    runner.start()
    time.sleep(0.3)
    began = time.monotonic()
    handle.stop(grace_s=0.5)
    assert time.monotonic() - began < 3
    runner.join(5)
    assert handle.exitcode == -signal.SIGKILL
    assert handle.pid is not None and not psutil.pid_exists(handle.pid)
    assert len(errors) == 1 and isinstance(errors[0], ModelCrashed)


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (job("invalid"), "input.temperature"),
        ({**job(), "input": {"prompt": "x", "max_tokens": 0}}, "input.max_tokens"),
    ],
    ids=["raised-by-kind", "rejected-by-parse-job"],
)
def test_fusion_error_from_job_keeps_child_alive_with_code_and_field(
    started: Callable[..., ModelProcess], document: dict[str, Any], field: str
) -> None:
    handle = started(spec())
    with pytest.raises(InvalidInput) as info:
        handle.run(document)
    assert info.value.to_dict()["code"] == "invalid_input"
    assert info.value.field == field
    assert handle.alive
    result, _, _ = handle.run(job())
    assert result["pid"] == handle.pid


def test_exception_in_job_becomes_inference_error_and_child_lives(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec())
    with pytest.raises(InferenceError, match="model 'stand-in': RuntimeError: device lost"):
        handle.run(job("raise"))
    assert handle.alive


def test_allocation_failure_in_job_is_out_of_memory(
    started: Callable[..., ModelProcess],
) -> None:
    handle = started(spec())
    with pytest.raises(OutOfMemory, match=r"\[metal::malloc\]"):
        handle.run(job("oom"))


def test_runs_on_one_handle_are_serialized(started: Callable[..., ModelProcess]) -> None:
    handle = started(spec())
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: results.append(handle.run(job("sleep", sleep_s="0.4"))[0]))
        for _ in range(2)
    ]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 2
    assert time.monotonic() - began >= 0.8


def test_child_output_goes_to_stderr_not_stdout(
    started: Callable[..., ModelProcess], capfd: pytest.CaptureFixture[str]
) -> None:
    handle = started(spec())
    handle.run(job("print"))
    out, err = capfd.readouterr()
    assert "noise from the model" not in out
    assert "noise from the model" in err


_PARENT_DIES_SCRIPT = """
import json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.process import ModelProcess
spec = ModelSpec(id="stand-in", kind="lm", path="/nonexistent")
handle = ModelProcess(spec, "crash_kind", max_input_bytes=1_000_000)
handle.start(timeout_s=60)
if sys.argv[2] == "busy":
    threading.Thread(target=handle.run, args=(json.loads(sys.argv[3]),), daemon=True).start()
    time.sleep(0.3)
print(handle.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_child_exits_when_its_parent_dies(state: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PARENT_DIES_SCRIPT,
            str(TESTS),
            state,
            json.dumps(job("sleep", sleep_s="60")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    child = int(done.stdout.split()[-1])
    assert gone(child, 5.0)


@pytest.mark.parametrize("marker", OOM_MARKERS)
def test_error_reply_reports_allocation_failures_as_out_of_memory(marker: str) -> None:
    reply = error_reply(RuntimeError(f"boom {marker.upper()} boom"), InferenceError, "model 'm'")
    assert reply["code"] == "out_of_memory"
    assert reply["message"].startswith("model 'm': RuntimeError: boom")


def test_error_reply_classifies_wrapped_and_plain_errors() -> None:
    wrapped = ModelLoadError("model 'm': RuntimeError: [metal::malloc] Resource limit exceeded")
    assert error_reply(wrapped, ModelLoadError, "model 'm'") == {
        "code": "out_of_memory",
        "message": "model 'm': RuntimeError: [metal::malloc] Resource limit exceeded",
    }
    assert error_reply(MemoryError(), InferenceError, "model 'm'")["code"] == "out_of_memory"
    assert error_reply(ValueError("bad"), ModelLoadError, "model 'm'") == {
        "code": "model_load_failed",
        "message": "model 'm': ValueError: bad",
    }
    assert error_reply(RuntimeError("nan"), InferenceError, "model 'm'")["code"] == (
        "inference_failed"
    )
    # a client's input may mention memory; validation errors are never reclassified
    invalid = InvalidInput("say 'out of memory'", field="input.prompt")
    assert error_reply(invalid, InferenceError, "model 'm'") == invalid.to_dict()


def test_in_process_model_runs_chat_job_on_tiny_model(tiny_model_dir: Path) -> None:
    handle = InProcessModel(spec("tiny-llama", tiny_model_dir), LM, max_input_bytes=MAX_INPUT_BYTES)
    report = handle.start(timeout_s=60)
    assert handle.alive and handle.pid == os.getpid()
    result, metrics, memory = handle.run(CHAT_JOB)
    handle.stop()
    assert report.memory.active_bytes > 0
    assert result["object"] == "chat.completion"
    assert metrics["completion_tokens"] <= 3
    assert memory.active_bytes > 0
    assert not handle.alive
    with pytest.raises(ModelCrashed):
        handle.run(CHAT_JOB)
