"""bench/multi_gpu: one worker per GPU from one command (``mlx-fusion worker --gpus``), against
one worker on one GPU, in the same run.

    python3 bench/multi_gpu.py [--shape 1b] [--jobs 128] [--gpus 0,1]

The same random-weight Llama (``gpu_lm``'s shapes, EOS never generated) serves the same
completion jobs twice: first ``mlx-fusion worker --gpus 0`` (one worker), then ``mlx-fusion worker
--gpus 0,1`` (one worker per GPU, each with ``CUDA_VISIBLE_DEVICES`` for its model processes). All
jobs are submitted at once; tok/s is their completion tokens over first submit -> last finish.
Each side warms its workers (the model loaded on every GPU) before it is timed. The store is the
embedded one (shared by the worker processes); Redis is a redis-server started here. Prints one
JSON object: both sides, their ratio, which worker (GPU) ran how many jobs, and the machine.
``--gpus 0`` alone with ``--shape tiny`` runs on a CPU machine (a test does).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_lm import (  # noqa: E402
    build_model,
    eos_id,
    job_figures,
    machine,
    submit_completions,
    worker_env,
)
from overhead import start_redis  # noqa: E402
from redis import Redis  # noqa: E402

POLL_S = 0.05


def _catalog(path: Path, model_dir: Path, batch: int) -> None:
    path.write_text(
        f'[models.bench]\nkind = "lm"\npath = "{model_dir}"\nmax_batch_size = {batch}\n',
        encoding="utf-8",
    )


def _prompts(shape: str, n: int, tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = eos_id(shape) - 1
    return [[rng.randint(0, top) for _ in range(tokens)] for _ in range(n)]


def side(
    gpus: str, shape: str, model_dir: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    from mlx_fusion.client import Client
    from mlx_fusion.config import Settings
    from mlx_fusion.jobs.backends import connect_store
    from mlx_fusion.jobs.document import FINAL_STATUSES

    tag = gpus.replace(",", "-")
    data_dir, catalog = work / f"data-{tag}", work / f"models-{tag}.toml"
    _catalog(catalog, model_dir, args.batch)
    (work / f"redis-{tag}").mkdir()
    redis_proc, url = start_redis(work / f"redis-{tag}")
    settings = Settings(
        redis_url=url,
        data_dir=data_dir,
        catalog_path=catalog,
        _env_file=None,  # type: ignore[call-arg]
    )
    store = connect_store(settings)
    client = Client(settings, Redis.from_url(url), store)
    final = {s.value for s in FINAL_STATUSES}
    log = (work / f"worker-{tag}.log").open("wb")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "mlx_fusion", "worker", "--gpus", gpus],
        env=worker_env(url, "embedded", data_dir, catalog),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )

    def run(prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
        submitted, ids = submit_completions(client, "bench", prompts, max_tokens)
        deadline = time.monotonic() + args.timeout_s
        records: list[dict[str, Any]] = []
        while True:
            records = [client.get(i) or {} for i in ids]
            if all(r.get("status") in final for r in records):
                break
            if supervisor.poll() is not None:
                raise RuntimeError(f"the workers exited ({supervisor.returncode}); see the log")
            if time.monotonic() > deadline:
                raise TimeoutError("jobs unfinished")
            time.sleep(POLL_S)
        figures = job_figures(records, submitted)
        figures["jobs_per_worker"] = {}
        for r in records:
            name = str(r.get("worker"))
            figures["jobs_per_worker"][name] = figures["jobs_per_worker"].get(name, 0) + 1
        return [figures]

    try:
        workers = len(gpus.split(","))
        # warm: enough jobs that every worker loads the model (each takes what it can)
        run(_prompts(shape, args.batch * workers, args.prompt_tokens, 1), 8)
        (figures,) = run(_prompts(shape, args.jobs, args.prompt_tokens, 2), args.new_tokens)
    finally:
        supervisor.terminate()
        try:
            supervisor.wait(60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
        log.close()
        redis_proc.terminate()
        redis_proc.wait()
    return {"gpus": gpus, "workers": workers, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--jobs", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the model")
    parser.add_argument("--gpus", default="0,1")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--timeout-s", type=float, default=400)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-multi-gpu-") as tmp_name:
        work = Path(tmp_name)
        model_dir = work / f"model-{args.shape}"
        built = subprocess.run(  # in a child: the GPU memory of the build goes back
            [
                sys.executable,
                "-c",
                "import sys, json; sys.path.insert(0, sys.argv[1]); from gpu_lm import build_model;"
                " from pathlib import Path;"
                " print(json.dumps(build_model(sys.argv[2], Path(sys.argv[3]))))",
                str(HERE),
                args.shape,
                str(model_dir),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        model = json.loads(built.stdout.strip().splitlines()[-1])
        first = args.gpus.split(",")[0]
        one = side(first, args.shape, model_dir, work, args)
        many = side(args.gpus, args.shape, model_dir, work, args) if "," in args.gpus else None
    report = {
        "benchmark": "multi_gpu",
        "shape": args.shape,
        "model": model,
        "jobs": args.jobs,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "one_gpu": one,
        "all_gpus": many,
        "ratio_tokens_per_s": None
        if many is None
        else round(many["tokens_per_s"] / one["tokens_per_s"], 3),
        "machine": machine({}),
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    del build_model  # built in a child process (above)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
