"""Several NVIDIA GPUs on one host from one command: ``mlx-fusion worker --gpus 0,1`` (or ``all``)
starts one ``mlx-fusion worker`` process per GPU and supervises them.

- **One GPU each.** A child runs with ``CUDA_VISIBLE_DEVICES=<id>`` (and, unless set,
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so that the id means the GPU ``nvidia-smi`` shows under it);
  its model processes, spawned by it, inherit both. The memory budget is therefore per GPU.
- **Real processes, never a fork**: children are started with ``subprocess`` as
  ``python -m mlx_fusion worker`` with the same options less ``--gpus``. This process touches no
  GPU and no MLX.
- **Names**: ``<FUSION_WORKER_NAME>.gpu<id>`` when a name is set, else ``<host>.gpu<id>.<random>``.
- **Metrics ports**: with ``FUSION_METRICS_PORT=P``, GPU 0's worker serves on P and GPU N >= 1's
  on P + 1 + N (P + 1 is the webhook worker's, as in the systemd units); 0 stays 0 (free ports).
- **Signals**: each child has its own process group, so a terminal's Ctrl-C reaches only this
  process, which passes SIGTERM or SIGINT on to every child once (RQ's warm shutdown: the running
  job finishes; a second signal is passed on too, and is RQ's cold shutdown), then waits. On
  Linux a child also gets SIGTERM if this process dies.
- **Restarts**: a child that exits non-zero while no stop was asked for is restarted after a
  backoff, its stale Redis registration dropped first (so a fixed name can register again). After
  ``MAX_FAST_FAILURES`` consecutive runs shorter than ``FAST_FAILURE_S`` on one GPU, the
  supervisor gives up: it stops the other children and exits 1. A child that exits 0 (``--burst``,
  ``--max-jobs``) is done.
- **Exit code**: 0 when every child's last run ended with 0, else 1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

import structlog

from mlx_fusion.config import Settings
from mlx_fusion.webhooks.delivery import retry_delay_s

log = structlog.get_logger(__name__)

GPUS_ENV = "FUSION_GPUS"
"""The environment variable ``--gpus`` reads; never passed on to a child."""

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Wait before restarting a dead child, by its count of consecutive fast failures."""

RESTART_JITTER = 0.2
"""Each restart wait is stretched or shrunk by up to this fraction, at random."""

FAST_FAILURE_S = 60.0
"""A child that dies sooner than this after its start counts as a fast failure."""

MAX_FAST_FAILURES = 5
"""Consecutive fast failures of one GPU's worker after which the supervisor gives up."""

NVIDIA_SMI_TIMEOUT_S = 30.0
"""Longest wait for ``nvidia-smi`` to list the GPUs."""

_GPU_ID = re.compile(r"^[0-9]+$")


class GpuSelectionError(ValueError):
    """``--gpus`` names no usable GPU: a malformed list, or ``all`` where none can be listed."""


def parse_gpus(text: str) -> list[int] | Literal["all"]:
    """``all``, or a comma-separated list of distinct GPU indices (``0,1``) in the given order."""
    value = text.strip()
    if value.lower() == "all":
        return "all"
    items = [item.strip() for item in value.split(",")]
    if not value or any(not _GPU_ID.match(item) for item in items):
        raise GpuSelectionError(
            f"{text!r} is not 'all' or a comma-separated list of GPU indices like 0,1"
        )
    gpus = [int(item) for item in items]
    if len(set(gpus)) != len(gpus):
        raise GpuSelectionError(f"{text!r} names a GPU more than once")
    return gpus


def detect_gpus(nvidia_smi: str | None = None) -> list[int]:
    """The indices of every NVIDIA GPU ``nvidia-smi`` lists (``--gpus all``)."""
    binary = nvidia_smi or shutil.which("nvidia-smi")
    if binary is None:
        raise GpuSelectionError(
            "--gpus all: nvidia-smi is not on PATH, so the GPUs cannot be listed; install the "
            "NVIDIA driver utilities or name the GPUs (--gpus 0,1)"
        )
    args = [binary, "--query-gpu=index", "--format=csv,noheader"]
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GpuSelectionError(f"--gpus all: {' '.join(args)} failed: {e}") from e
    said = (done.stdout.strip() or done.stderr.strip()).splitlines()[:1]
    if done.returncode != 0:
        raise GpuSelectionError(
            f"--gpus all: {' '.join(args)} exited with {done.returncode}"
            + (f": {said[0]}" if said else "")
        )
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        raise GpuSelectionError("--gpus all: nvidia-smi lists no GPU")
    if any(not _GPU_ID.match(line) for line in lines):
        raise GpuSelectionError(f"--gpus all: unexpected nvidia-smi output: {lines[0]!r}")
    return [int(line) for line in lines]


def worker_name(base: str | None, gpu: int, host: str, token: str) -> str:
    """The name of GPU ``gpu``'s worker: ``<base>.gpu<id>``, or ``<host>.gpu<id>.<token>``."""
    return f"{base}.gpu{gpu}" if base else f"{host}.gpu{gpu}.{token}"


def metrics_port(base: int | None, gpu: int) -> int | None:
    """GPU ``gpu``'s metrics port: ``base`` for GPU 0, ``base + 1 + gpu`` after it (``base + 1``
    is left to the webhook worker); none without a base, and 0 (a free port) for 0."""
    if base is None or base == 0:
        return base
    return base if gpu == 0 else base + 1 + gpu


def child_env(
    env: Mapping[str, str],
    gpu: int,
    name: str,
    port: int | None,
    redis_url: str | None = None,
) -> dict[str, str]:
    """The environment of GPU ``gpu``'s worker: ``env`` with that GPU alone visible, its name, its
    metrics port and (when the supervisor started the embedded one) the Redis URL."""
    out = {k: v for k, v in env.items() if k != GPUS_ENV}
    out["CUDA_VISIBLE_DEVICES"] = str(gpu)
    out.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    out["FUSION_WORKER_NAME"] = name
    if port is not None:
        out["FUSION_METRICS_PORT"] = str(port)
    if redis_url is not None:
        out["FUSION_REDIS_URL"] = redis_url
    return out


def worker_command(
    burst: bool = False, max_jobs: int | None = None, json_logs: bool = False
) -> list[str]:
    """``mlx-fusion worker`` with these options (and no ``--gpus``), as a child runs it."""
    command = [sys.executable, "-m", "mlx_fusion", "worker"]
    if burst:
        command.append("--burst")
    if max_jobs is not None:
        command += ["--max-jobs", str(max_jobs)]
    if json_logs:
        command.append("--json-logs")
    return command


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def prepare() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return prepare


@dataclass
class _Child:
    gpu: int
    name: str = ""
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    fast_failures: int = 0
    restart_at: float | None = None
    returncode: int | None = None
    done: bool = False


class GpuSupervisor:
    """Runs ``command`` (``mlx-fusion worker`` by default) once per GPU, as the module docstring
    says; ``run()`` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        gpus: Sequence[int],
        command: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        redis_url: str | None = None,
        restart_backoff_s: Sequence[float] = RESTART_BACKOFF_S,
        fast_failure_s: float = FAST_FAILURE_S,
        max_fast_failures: int = MAX_FAST_FAILURES,
        poll_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self.command = list(command or worker_command())
        self.env = dict(os.environ if env is None else env)
        self.redis_url = redis_url
        self.restart_backoff_s = tuple(restart_backoff_s)
        self.fast_failure_s = fast_failure_s
        self.max_fast_failures = max_fast_failures
        self.poll_s = poll_s
        self.children = [_Child(gpu) for gpu in gpus]
        self.stopping = False
        self.gave_up = False
        self._host = socket.gethostname()

    def run(self) -> int:
        """Start every child, supervise them until all have ended; 0 when all ended with 0."""
        if self.env.get("CUDA_VISIBLE_DEVICES"):
            log.warning(
                "cuda_visible_devices_replaced",
                was=self.env["CUDA_VISIBLE_DEVICES"],
                gpus=[c.gpu for c in self.children],
            )
        handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        log.info("gpu_workers_starting", gpus=[c.gpu for c in self.children])
        try:
            for child in self.children:
                if self.stopping:  # a signal came while the others started
                    child.done = True
                else:
                    self._start(child)
            while not all(c.done for c in self.children):
                time.sleep(self.poll_s)
                self._check()
        except BaseException:
            self._signal_all(signal.SIGTERM)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        failed = [c.gpu for c in self.children if c.returncode not in (0, None)]
        code = 1 if failed or self.gave_up else 0
        log.info("gpu_workers_stopped", exit_code=code, failed_gpus=failed)
        return code

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every child to stop (``signum`` passed on); pending restarts are dropped."""
        self.stopping = True
        self._signal_all(signum)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("gpu_workers_stopping", signal=signal.Signals(signum).name)
        self.stop(signum)

    def _signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    def _start(self, child: _Child) -> None:
        child.name = worker_name(
            self.settings.worker_name, child.gpu, self._host, uuid.uuid4().hex[:8]
        )
        env = child_env(
            self.env,
            child.gpu,
            child.name,
            metrics_port(self.settings.metrics_port, child.gpu),
            self.redis_url,
        )
        child.proc = subprocess.Popen(
            self.command, env=env, process_group=0, preexec_fn=_die_with_parent(os.getpid())
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("gpu_worker_started", gpu=child.gpu, pid=child.proc.pid, worker=child.name)
        if self.stopping:  # the signal came while Popen ran, before the child could be told
            child.proc.send_signal(signal.SIGTERM)

    def _check(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.done:
                continue
            if child.proc is None:
                if self.stopping:
                    child.done = True
                elif child.restart_at is not None and now >= child.restart_at:
                    self._start(child)
                continue
            returncode = child.proc.poll()
            if returncode is None:
                continue
            self._ended(child, child.proc.pid, returncode, now - child.started_at)

    def _ended(self, child: _Child, pid: int, returncode: int, ran_s: float) -> None:
        child.proc = None
        child.returncode = returncode
        fields: dict[str, Any] = {
            "gpu": child.gpu,
            "pid": pid,
            "worker": child.name,
            "returncode": returncode,
            "ran_s": round(ran_s, 1),
        }
        if self.stopping or returncode == 0:
            log.info("gpu_worker_exited", **fields)
            child.done = True
            return
        log.error("gpu_worker_died", **fields)
        self._drop_registration(child.name, pid)
        child.fast_failures = child.fast_failures + 1 if ran_s < self.fast_failure_s else 0
        if child.fast_failures >= self.max_fast_failures:
            log.error("gpu_worker_gave_up", gpu=child.gpu, fast_failures=child.fast_failures)
            child.done = True
            self.gave_up = True
            self.stop(signal.SIGTERM)
            return
        index = min(child.fast_failures, len(self.restart_backoff_s) - 1)
        delay_s = retry_delay_s(self.restart_backoff_s, index, RESTART_JITTER)
        child.restart_at = time.monotonic() + delay_s
        log.warning(
            "gpu_worker_restarting",
            gpu=child.gpu,
            delay_s=round(delay_s, 2),
            fast_failures=child.fast_failures,
        )

    def _drop_registration(self, name: str, pid: int) -> None:
        """Mark a dead child's RQ registration dead (it died without doing so), so that a
        restart under the same name can register and ``status`` shows no ghost; only if the
        registration is that process's, on this host."""
        from redis.exceptions import RedisError
        from rq.worker import Worker

        from mlx_fusion.errors import FusionError
        from mlx_fusion.services import redis_connection

        settings = self.settings.model_copy(update={"redis_retry_s": 0.0})
        try:
            connection = redis_connection(settings)
            found = Worker.find_by_key(
                Worker.redis_worker_namespace_prefix + name, connection=connection
            )
            if found is None or found.pid != pid or found.hostname != self._host:
                return
            found.register_death()  # type: ignore[no-untyped-call]
            log.info("gpu_worker_registration_dropped", worker=name, pid=pid)
        except (RedisError, FusionError, OSError) as e:
            log.warning("gpu_worker_registration_not_dropped", worker=name, error=str(e))
