"""bench/stream: how long a streamed token takes from the model to a ``Client.stream`` reader.

    .venv/bin/python bench/stream.py [--jobs 20] [--tokens 32]

A real ``FusionWorker`` (this process's main thread) runs chat jobs with ``stream: true`` on a
tiny random-weight Llama in a batching model process; a reader thread follows each job's stream
with ``Client.iter_stream_entries``. Every entry carries ``produced_at``, the time the model
process produced the piece, and the reader notes when it received it: the difference is the
whole path (model process -> pipe -> worker -> Redis stream -> reader). The baseline, measured
in the same run on the same redis-server, is the floor of that path: one ``XADD`` read back by a
blocked ``XREAD``. Prints one JSON object: first-chunk and every-chunk latency (p50, p99, max),
the baseline, the target (first chunk within 50 ms) and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from overhead import machine, percentile, start_redis  # noqa: E402
from redis import Redis  # noqa: E402
from rq.command import send_shutdown_command  # noqa: E402

TARGET_FIRST_CHUNK_MS = 50.0


def _stats(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def baseline(redis: Redis, rounds: int) -> dict[str, float]:
    """XADD in one thread, a blocked XREAD in another: the transport's floor."""
    key = "bench:stream:baseline"
    redis.delete(key)
    latencies: list[float] = []
    reader = Redis(connection_pool=redis.connection_pool)
    last = "0"
    for _ in range(rounds):
        threading.Timer(0.002, lambda: redis.xadd(key, {"t": repr(time.time())})).start()
        answer = reader.xread({key: last}, block=5000)
        received = time.time()
        entry_id, fields = answer[0][1][0]
        last = entry_id
        latencies.append(received - float(fields[b"t"]))
    return _stats(latencies)


def fusion(redis: Redis, url: str, tmp: Path, jobs: int, tokens: int) -> dict[str, Any]:
    from tiny_models import build_tiny_llama

    from mlx_fusion.client import Client
    from mlx_fusion.config import Settings
    from mlx_fusion.jobs.backends import connect_store
    from mlx_fusion.registry import Catalog, ModelRegistry
    from mlx_fusion.runner import JobRunner
    from mlx_fusion.worker import FusionWorker

    model_dir = build_tiny_llama(tmp / "tiny")
    catalog = tmp / "models.toml"
    catalog.write_text(f'[models.tiny]\nkind = "lm"\npath = "{model_dir}"\n', encoding="utf-8")
    settings = Settings(
        redis_url=url,
        mongo_url="mongomock://",
        data_dir=tmp / "data",
        catalog_path=catalog,
        keep_alive_s=-1,
        log_level="WARNING",
        _env_file=None,  # type: ignore[call-arg]
    )
    store = connect_store(settings)
    client = Client(settings, redis, store)
    first: list[float] = []
    every: list[float] = []
    chunks_per_job: list[int] = []
    failures: list[str] = []

    def produce() -> None:
        for n in range(jobs + 1):  # the first job loads the model and is not counted
            document = {
                "kind": "chat.completion",
                "model": "tiny",
                "input": {
                    "messages": [{"role": "user", "content": f"Tell me a story, number {n}."}],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "stream": True,
                },
            }
            job_id = client.submit(document)
            latencies = []
            try:
                for entry in client.iter_stream_entries(job_id, timeout_s=60, block_ms=1000):
                    delta = (entry.chunk or {}).get("choices") or [{}]
                    if delta[0].get("delta", {}).get("content"):
                        latencies.append(entry.received_at - entry.produced_at)
            except Exception as e:
                failures.append(f"{job_id}: {type(e).__name__}: {e}")
                continue
            if n == 0 or not latencies:
                continue
            first.append(latencies[0])
            every.extend(latencies)
            chunks_per_job.append(len(latencies))

    registry = ModelRegistry(Catalog.load(catalog), settings)
    worker = FusionWorker(
        settings=settings, connection=redis, runner=JobRunner(settings, store, registry)
    )

    def produce_then_stop() -> None:
        try:
            produce()
        finally:  # jobs that joined a running batch are not counted by max_jobs: stop by command
            send_shutdown_command(redis, worker.name)

    producer = threading.Thread(target=produce_then_stop, daemon=True)
    producer.start()
    worker.work(logging_level="WARNING")
    producer.join(120)
    if failures or not first:
        raise SystemExit(f"streaming failed: {failures or 'no chunks'}")
    return {
        "first_chunk": _stats(first),
        "every_chunk": _stats(every),
        "chunks_per_job": round(sum(chunks_per_job) / len(chunks_per_job), 1),
        "jobs": len(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from mlx_fusion import logs

    logs.configure("console", "WARNING")
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp_name:
        tmp = Path(tmp_name)
        proc, url = start_redis(tmp)
        try:
            redis = Redis.from_url(url)
            base = baseline(redis, 200)
            ours = fusion(redis, url, tmp, args.jobs, args.tokens)
        finally:
            proc.terminate()
            proc.wait()
    first_p99 = ours["first_chunk"]["p99_ms"]
    print(
        json.dumps(
            {
                "benchmark": "stream",
                "tokens_per_job": args.tokens,
                "baseline": {"what": "XADD read back by a blocked XREAD, same redis", **base},
                "fusion": {
                    "what": "model process -> worker -> Redis stream -> Client.iter_stream_entries",
                    **ours,
                },
                "first_chunk_p50_over_baseline_ms": round(
                    ours["first_chunk"]["p50_ms"] - base["p50_ms"], 3
                ),
                "target": {"first_chunk_ms_at_most": TARGET_FIRST_CHUNK_MS},
                "meets_target": ours["first_chunk"]["max_ms"] <= TARGET_FIRST_CHUNK_MS,
                "first_chunk_p99_ms": first_p99,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
