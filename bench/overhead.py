"""bench/overhead: what mlx-fusion's full path costs per job, against stock RQ in the same run.

    .venv/bin/python bench/overhead.py [--jobs 300] [--mongo-url URL]

Both sides run a job that does nothing, one job at a time, the worker in this process's main
thread and the producer in another thread, on one real redis-server (started here on a free
loopback port):

- **baseline**: RQ's stock ``SimpleWorker`` running a no-op function; latency is enqueue -> the
  RQ job reads ``finished``.
- **fusion**: ``FusionWorker`` with a model kind that does no work, in its own model process (as
  in production); latency is ``Client.submit`` -> the job record reads ``completed``. The store
  is mongomock (in process) unless ``--mongo-url`` names a real MongoDB.

Then each runs the same jobs kept 16 deep in its queue, for jobs/s. Prints one JSON object: each
side's p50, p99 and jobs/s, the differences and ratios, the target (p50 at most 5 ms above the
baseline) and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import noop_kind  # noqa: E402
from redis import Redis  # noqa: E402
from rq import Queue, SimpleWorker  # noqa: E402
from rq.job import Job as RQJob  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

TARGET_P50_OVERHEAD_MS = 5.0
POLL_S = 0.0005
WINDOW = 16
"""Jobs kept waiting in the queue while throughput is measured."""
MODEL = "noop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        from mlx_fusion.services import redis_server_binary

        binary = redis_server_binary()
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            Redis.from_url(url).ping()
            return proc, url
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[rank - 1]


def summary(latencies_s: list[float], queued_jobs: int, queued_s: float) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "sequential_jobs_per_s": round(len(ms) / (sum(latencies_s) or 1e-9), 1),
        "queued_jobs_per_s": round(queued_jobs / queued_s, 1),
    }


def measure(
    work: Callable[[int], None], submit_and_wait: Callable[[], float], jobs: int, warmup: int
) -> list[float]:
    """Run ``work(max_jobs)`` (a worker) in this thread while another thread submits jobs one
    at a time; returns the latencies after the warm-up."""
    latencies: list[float] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for _ in range(warmup + jobs):
                latencies.append(submit_and_wait())
        except BaseException as e:  # surfaced after the worker stops
            errors.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    work(warmup + jobs)
    producer.join(timeout=60)
    if errors:
        raise errors[0]
    return latencies[warmup:]


def throughput(
    work: Callable[[int], None],
    submit: Callable[[], str],
    done: Callable[[str], None],
    jobs: int,
) -> float:
    """Seconds for the worker (``work(max_jobs)``, this thread) to run ``jobs`` jobs that
    another thread keeps ``WINDOW`` deep in the queue (``done`` waits for one and clears it)."""
    errors: list[BaseException] = []
    began = time.perf_counter()

    def produce() -> None:
        try:
            waiting = [submit() for _ in range(min(WINDOW, jobs))]
            sent = len(waiting)
            while waiting:
                done(waiting.pop(0))
                if sent < jobs:
                    waiting.append(submit())
                    sent += 1
        except BaseException as e:  # surfaced after the worker stops
            errors.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    work(jobs)
    producer.join(timeout=60)
    if errors:
        raise errors[0]
    return time.perf_counter() - began


def wait_finished(redis: Redis, job_id: str) -> None:
    """Until RQ marks the job finished."""
    rq_job = RQJob(job_id, connection=redis, serializer=JSONSerializer)
    while rq_job.get_status(refresh=True) != "finished":
        time.sleep(POLL_S)


def baseline(redis: Redis, jobs: int, warmup: int) -> dict[str, float]:
    queue = Queue("bench-baseline", connection=redis, serializer=JSONSerializer)

    def submit() -> str:
        return str(queue.enqueue_call("noop_kind.noop").id)

    def submit_and_wait() -> float:
        began = time.perf_counter()
        wait_finished(redis, submit())
        return time.perf_counter() - began

    def work(max_jobs: int) -> None:
        SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(
            max_jobs=max_jobs, logging_level="WARNING"
        )

    latencies = measure(work, submit_and_wait, jobs, warmup)
    elapsed = throughput(work, submit, lambda i: wait_finished(redis, i), jobs)
    return summary(latencies, jobs, elapsed)


def fusion(
    redis: Redis,
    redis_url: str,
    mongo_url: str | None,
    jobs: int,
    warmup: int,
    tmp: Path,
    lookahead: int,
) -> dict[str, float]:
    from mlx_fusion.client import Client
    from mlx_fusion.config import Settings
    from mlx_fusion.jobs.backends import connect_store
    from mlx_fusion.registry import Catalog, ModelRegistry
    from mlx_fusion.registry.catalog import ModelKind
    from mlx_fusion.runner import JobRunner
    from mlx_fusion.worker import FusionWorker

    model_dir = tmp / "noop-model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"\0" * 1024)
    catalog = tmp / "models.toml"
    catalog.write_text(f'[models.{MODEL}]\nkind = "lm"\npath = "{model_dir}"\n', encoding="utf-8")
    settings = Settings(
        redis_url=redis_url,
        mongo_url=mongo_url or "mongomock://",
        mongo_db=f"bench_overhead_{os.getpid()}",
        data_dir=tmp / "data",
        catalog_path=catalog,
        keep_alive_s=-1,
        schedule_lookahead=lookahead,
        log_level="WARNING",
        _env_file=None,  # type: ignore[call-arg]
    )
    store = connect_store(settings)
    client = Client(settings, redis, store)
    document = {"kind": "completion", "model": MODEL, "input": {"prompt": "x"}}

    def build() -> FusionWorker:
        registry = ModelRegistry(Catalog.load(catalog), settings, kinds={ModelKind.LM: noop_kind})
        return FusionWorker(
            settings=settings, connection=redis, runner=JobRunner(settings, store, registry)
        )

    def forget(job_id: str) -> None:
        # mongomock scans its whole collection on every query; an indexed MongoDB does not:
        # keep the collection small so the store costs what a real one would
        record = store.get(job_id) or {}
        if record.get("status") != "completed":
            raise RuntimeError(f"job {job_id} ended {record.get('status')}: {record}")
        store.collection.delete_one({"_id": job_id})

    def done(job_id: str) -> None:
        # RQ marks the job finished after the worker's final store write: the signal the
        # baseline waits for, read the same way (polling an in-process store would compete
        # with the worker for this process's GIL)
        wait_finished(redis, job_id)
        forget(job_id)

    def submit() -> str:
        return client.submit(document)

    def submit_and_wait() -> float:
        began = time.perf_counter()
        job_id = submit()
        wait_finished(redis, job_id)
        elapsed = time.perf_counter() - began
        forget(job_id)
        return elapsed

    def work(max_jobs: int) -> None:
        build().work(max_jobs=max_jobs, logging_level="WARNING")

    latencies = measure(work, submit_and_wait, jobs, warmup)
    elapsed = throughput(work, submit, done, jobs)
    if mongo_url:
        store.collection.database.client.drop_database(settings.mongo_db)
    return summary(latencies, jobs, elapsed)


def machine() -> dict[str, Any]:
    import mlx_fusion

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx_fusion": mlx_fusion.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--mongo-url", default=os.environ.get("FUSION_TEST_MONGO_URL"))
    parser.add_argument(
        "--lookahead", type=int, default=64, help="FUSION_SCHEDULE_LOOKAHEAD of the worker"
    )
    args = parser.parse_args()
    from mlx_fusion import logs

    logs.configure("console", "WARNING")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        proc, url = start_redis(tmp)
        try:
            redis = Redis.from_url(url)
            base = baseline(redis, args.jobs, args.warmup)
            redis.flushdb()
            ours = fusion(redis, url, args.mongo_url, args.jobs, args.warmup, tmp, args.lookahead)
        finally:
            proc.terminate()
            proc.wait()
    overhead = ours["p50_ms"] - base["p50_ms"]
    print(
        json.dumps(
            {
                "benchmark": "overhead",
                "jobs": args.jobs,
                "store": "mongodb" if args.mongo_url else "mongomock",
                "schedule_lookahead": args.lookahead,
                "baseline": {"what": "stock RQ SimpleWorker, no-op function", **base},
                "fusion": {"what": "FusionWorker, no-op model kind in a model process", **ours},
                "p50_overhead_ms": round(overhead, 3),
                "p99_overhead_ms": round(ours["p99_ms"] - base["p99_ms"], 3),
                "ratio_p50": round(ours["p50_ms"] / base["p50_ms"], 3),
                "ratio_queued_jobs_per_s": round(
                    ours["queued_jobs_per_s"] / base["queued_jobs_per_s"], 3
                ),
                "target": {"p50_overhead_ms_at_most": TARGET_P50_OVERHEAD_MS},
                "meets_target": overhead <= TARGET_P50_OVERHEAD_MS,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
