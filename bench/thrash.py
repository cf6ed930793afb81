"""bench/thrash: a mixed stream of jobs over several models with room for one loaded at a time,
run first in arrival order (FIFO, ``schedule_lookahead=0``) and then model-aware (the default),
in the same run.

    .venv/bin/python bench/thrash.py [--models 3] [--jobs 30] [--max-wait-s 120]

The models are tiny random-weight Llamas (built here, as the tests build them) loaded by the real
mlx-lm kind in model processes, so a switch costs a real process start and load; each job
generates 4 tokens. All jobs are queued before the worker starts, in a seeded random order.
Prints one JSON object: model loads, makespan and the longest queue wait for each order, their
ratios, the targets (at most half the loads, makespan at most 0.7x, no wait past the maximum)
and the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from overhead import machine, start_redis  # noqa: E402
from redis import Redis  # noqa: E402


def run(
    redis: Redis,
    url: str,
    tmp: Path,
    catalog: Path,
    order: list[str],
    *,
    lookahead: int,
    max_wait_s: float,
) -> dict[str, Any]:
    from mlx_fusion.client import Client
    from mlx_fusion.config import Settings
    from mlx_fusion.jobs.backends import connect_store
    from mlx_fusion.registry import Catalog, ModelRegistry
    from mlx_fusion.runner import JobRunner
    from mlx_fusion.worker import FusionWorker

    redis.flushdb()
    settings = Settings(
        redis_url=url,
        mongo_url="mongomock://",
        data_dir=tmp / f"data-{lookahead}",
        catalog_path=catalog,
        max_loaded_models=1,
        keep_alive_s=-1,
        schedule_lookahead=lookahead,
        schedule_max_wait_s=max_wait_s,
        log_level="WARNING",
        _env_file=None,  # type: ignore[call-arg]
    )
    store = connect_store(settings)
    client = Client(settings, redis, store)
    ids = [
        client.submit(
            {
                "kind": "completion",
                "model": model,
                "input": {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0},
            }
        )
        for model in order
    ]
    registry = ModelRegistry(Catalog.load(catalog), settings)
    worker = FusionWorker(
        settings=settings, connection=redis, runner=JobRunner(settings, store, registry)
    )
    began = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    makespan = time.perf_counter() - began
    loads = registry.snapshot()["stats"]["loads"]
    records = [store.get(i) or {} for i in ids]
    failed = [r.get("error") for r in records if r.get("status") != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not complete: {failed[:3]}")
    waits = [r["metrics"]["queue_wait_ms"] / 1000 for r in records]
    return {
        "model_loads": loads,
        "makespan_s": round(makespan, 3),
        "max_wait_s": round(max(waits), 3),
        "mean_wait_s": round(sum(waits) / len(waits), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--max-wait-s", type=float, default=120)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    from tiny_models import build_tiny_llama

    from mlx_fusion import logs

    logs.configure("console", "WARNING")
    with tempfile.TemporaryDirectory(prefix="bench-thrash-") as tmp_name:
        tmp = Path(tmp_name)
        names = [f"model-{i}" for i in range(args.models)]
        lines = []
        for name in names:
            model_dir = build_tiny_llama(tmp / name)
            lines.append(f'[models.{name}]\nkind = "lm"\npath = "{model_dir}"\n')
        catalog = tmp / "models.toml"
        catalog.write_text("\n".join(lines), encoding="utf-8")
        order = [random.Random(args.seed + i).choice(names) for i in range(args.jobs)]
        proc, url = start_redis(tmp)
        try:
            redis = Redis.from_url(url)
            fifo = run(redis, url, tmp, catalog, order, lookahead=0, max_wait_s=args.max_wait_s)
            aware = run(redis, url, tmp, catalog, order, lookahead=64, max_wait_s=args.max_wait_s)
        finally:
            proc.terminate()
            proc.wait()
    loads_ratio = aware["model_loads"] / fifo["model_loads"]
    makespan_ratio = aware["makespan_s"] / fifo["makespan_s"]
    print(
        json.dumps(
            {
                "benchmark": "thrash",
                "models": args.models,
                "jobs": args.jobs,
                "max_loaded_models": 1,
                "schedule_max_wait_s": args.max_wait_s,
                "fifo": fifo,
                "model_aware": aware,
                "ratio_model_loads": round(loads_ratio, 3),
                "ratio_makespan": round(makespan_ratio, 3),
                "targets": {
                    "ratio_model_loads_at_most": 0.5,
                    "ratio_makespan_at_most": 0.7,
                    "max_wait_s_at_most": args.max_wait_s,
                },
                "meets_targets": loads_ratio <= 0.5
                and makespan_ratio <= 0.7
                and aware["max_wait_s"] <= args.max_wait_s,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
