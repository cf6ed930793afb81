"""``mlx-fusion worker --gpus``: one worker process per GPU under a supervisor. No GPU here, so the
integration tests name GPU ids explicitly and check what each worker process was given."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import fusion_env, run_python, stop_process, wait_for
from redis import Redis
from rq.worker import Worker
from structlog.testing import capture_logs

from mlx_fusion.config import Settings
from mlx_fusion.gpus import (
    GpuSelectionError,
    GpuSupervisor,
    child_env,
    detect_gpus,
    metrics_port,
    parse_gpus,
    worker_name,
)

# ---- the option and its parts


def test_parse_gpus_accepts_all_and_a_list_in_order() -> None:
    assert parse_gpus("all") == "all"
    assert parse_gpus(" ALL ") == "all"
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus(" 3 , 0 ") == [3, 0]


@pytest.mark.parametrize("text", ["", " ", "x", "0,x", "-1", "0,,1", "1.5", "gpu0", "0;1", "0,0"])
def test_parse_gpus_refuses_bad_values(text: str) -> None:
    with pytest.raises(GpuSelectionError):
        parse_gpus(text)


def test_worker_refuses_a_bad_gpus_value(tmp_path: Path, redis_url: str) -> None:
    env = fusion_env(tmp_path, redis_url, tmp_path / "models.toml")
    done = run_python(env, "-m", "mlx_fusion", "worker", "--gpus", "0,zero", timeout_s=60)
    assert done.returncode == 2
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())  # typer's error box
    assert "'0,zero' is not 'all' or a comma-separated list of GPU indices" in said


def test_gpus_all_without_nvidia_smi_exits_2_naming_it(tmp_path: Path, redis_url: str) -> None:
    env = fusion_env(tmp_path, redis_url, tmp_path / "models.toml", FUSION_GPUS="all")
    env["PATH"] = str(tmp_path)  # an empty folder: no nvidia-smi
    done = run_python(env, "-m", "mlx_fusion", "worker", timeout_s=60)
    assert done.returncode == 2
    assert "error: --gpus all: nvidia-smi is not on PATH" in done.stderr


def _fake_nvidia_smi(tmp_path: Path, stdout: str, code: int) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{stdout}'\nexit {code}\n", encoding="utf-8")
    script.chmod(0o755)
    return str(script)


def test_gpus_all_is_every_index_nvidia_smi_lists(tmp_path: Path) -> None:
    assert detect_gpus(_fake_nvidia_smi(tmp_path, "0\\n1\\n2\\n", 0)) == [0, 1, 2]


def test_gpus_all_with_no_gpu_reports_what_nvidia_smi_said(tmp_path: Path) -> None:
    with pytest.raises(GpuSelectionError, match="exited with 6: No devices were found"):
        detect_gpus(_fake_nvidia_smi(tmp_path, "No devices were found\\n", 6))


def test_worker_names_show_the_gpu() -> None:
    assert worker_name("box", 1, "host", "abcd1234") == "box.gpu1"
    assert worker_name(None, 1, "host", "abcd1234") == "host.gpu1.abcd1234"


def test_metrics_ports_follow_the_systemd_layout() -> None:
    assert [metrics_port(9464, gpu) for gpu in (0, 1, 2, 3)] == [9464, 9466, 9467, 9468]
    assert metrics_port(None, 1) is None
    assert metrics_port(0, 2) == 0


def test_child_env_shows_one_gpu_and_never_passes_gpus_on() -> None:
    env = child_env({"FUSION_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1", "A": "b"}, 1, "n", 9466)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["FUSION_WORKER_NAME"] == "n" and env["FUSION_METRICS_PORT"] == "9466"
    assert "FUSION_GPUS" not in env and env["A"] == "b"
    kept = child_env({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, 0, "n", None, "redis://x")
    assert kept["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert kept["FUSION_REDIS_URL"] == "redis://x" and "FUSION_METRICS_PORT" not in kept


# ---- the supervisor with stand-in children

CHILD = "import os, sys, time; gpu = os.environ['CUDA_VISIBLE_DEVICES']; {body}"


def _supervisor(redis_url: str, body: str, **options: Any) -> GpuSupervisor:
    settings = Settings(_env_file=None, redis_url=redis_url)  # type: ignore[call-arg]
    command = [sys.executable, "-c", CHILD.format(body=body)]
    return GpuSupervisor(settings, [0, 1], command, poll_s=0.05, **options)


@pytest.mark.timeout(30)
def test_a_child_failing_fast_is_restarted_then_given_up_and_the_others_stopped(
    redis_url: str,
) -> None:
    supervisor = _supervisor(
        redis_url,
        "sys.exit(3) if gpu == '1' else time.sleep(60)",
        restart_backoff_s=(0.05,),
        max_fast_failures=3,
    )
    with capture_logs() as logs:
        assert supervisor.run() == 1
    events = [e["event"] for e in logs if e.get("gpu") == 1]
    assert events.count("gpu_worker_died") == 3
    assert events.count("gpu_worker_restarting") == 2
    assert "gpu_worker_gave_up" in events
    stopped = [e for e in logs if e["event"] == "gpu_worker_exited"]
    assert [(e["gpu"], e["returncode"]) for e in stopped] == [(0, -signal.SIGTERM)]


@pytest.mark.timeout(30)
def test_children_that_exit_0_are_done_and_the_supervisor_exits_0(redis_url: str) -> None:
    supervisor = _supervisor(redis_url, "sys.exit(0)")
    with capture_logs() as logs:
        assert supervisor.run() == 0
    assert not [e for e in logs if e["event"] == "gpu_worker_restarting"]


# ---- real workers on the session's Redis


@pytest.fixture
def start_supervisor(
    tmp_path: Path, redis: Redis, redis_url: str, catalog_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **extra: str) -> subprocess.Popen[bytes]:
        env = fusion_env(tmp_path, redis_url, catalog_path, **extra)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_fusion", "worker", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            children = []
        stop_process(proc, timeout_s=30)
        for child in children:
            if child.is_running():
                child.kill()


def _workers(redis: Redis) -> dict[str, int | None]:
    return {w.name: w.pid for w in Worker.all(connection=redis)}


def _children(supervisor: subprocess.Popen[bytes]) -> dict[str, int]:
    """GPU id -> pid of each live worker process the supervisor started."""
    found = {}
    for child in psutil.Process(supervisor.pid).children():
        try:
            found[child.environ()["CUDA_VISIBLE_DEVICES"]] = child.pid
        except (psutil.NoSuchProcess, KeyError):
            continue
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.timeout(60)
def test_one_worker_per_gpu_registers_with_its_gpu_alone_visible(
    start_supervisor: Callable[..., subprocess.Popen[bytes]], redis: Redis
) -> None:
    supervisor = start_supervisor("--gpus", "0,1")
    wait_for(lambda: len(_workers(redis)) == 2, 30, "two workers to register")
    workers = _workers(redis)
    host = re.escape(socket.gethostname())
    names = sorted(workers)
    assert re.fullmatch(rf"{host}\.gpu0\.[0-9a-f]{{8}}", names[0]), names
    assert re.fullmatch(rf"{host}\.gpu1\.[0-9a-f]{{8}}", names[1]), names
    children = _children(supervisor)
    assert sorted(children) == ["0", "1"]
    for gpu, pid in children.items():
        environ = _environ(pid)
        assert environ["CUDA_VISIBLE_DEVICES"] == gpu
        assert "FUSION_GPUS" not in environ
        assert workers[environ["FUSION_WORKER_NAME"]] == pid
        assert f".gpu{gpu}." in environ["FUSION_WORKER_NAME"]


@pytest.mark.timeout(60)
def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(
    start_supervisor: Callable[..., subprocess.Popen[bytes]], redis: Redis
) -> None:
    supervisor = start_supervisor(FUSION_GPUS="0,1", FUSION_WORKER_NAME="box")
    wait_for(lambda: sorted(_workers(redis)) == ["box.gpu0", "box.gpu1"], 30, "the workers")
    children = [psutil.Process(pid) for pid in _children(supervisor).values()]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert not any(child.is_running() and child.status() != "zombie" for child in children)
    assert _workers(redis) == {}


@pytest.mark.timeout(60)
def test_a_killed_worker_is_restarted_on_the_same_gpu_under_the_same_name(
    start_supervisor: Callable[..., subprocess.Popen[bytes]], redis: Redis
) -> None:
    supervisor = start_supervisor("--gpus", "0,1", FUSION_WORKER_NAME="box")
    wait_for(lambda: sorted(_workers(redis)) == ["box.gpu0", "box.gpu1"], 30, "the workers")
    before = _children(supervisor)
    os.kill(before["1"], signal.SIGKILL)
    wait_for(
        lambda: (
            _children(supervisor).get("1") not in (None, before["1"])
            and _workers(redis).get("box.gpu1") == _children(supervisor).get("1")
        ),
        30,
        "GPU 1's worker to come back",
    )
    after = _children(supervisor)
    assert after["0"] == before["0"]
    assert _environ(after["1"])["CUDA_VISIBLE_DEVICES"] == "1"
    assert supervisor.poll() is None
