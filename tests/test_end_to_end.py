"""The whole path with the real SmolLM2-135M-Instruct, and the worker as its own process
(``mlx-fusion worker`` and plain ``rq worker``) on the embedded job store."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_MODEL, fusion_env, run_python, write_catalog
from redis import Redis

from mlx_fusion.client import Client
from mlx_fusion.config import Settings
from mlx_fusion.jobs import connect_store

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.mark.slow
def test_smollm2_answers_paris_end_to_end(
    tmp_path: Path,
    redis: Redis,
    redis_url: str,
    smollm2_dir: Path,
    make_worker: Any,
    settings: Settings,
    store: Any,
) -> None:
    catalog = write_catalog(
        tmp_path / "real.toml", {"smollm2-135m": {"kind": "lm", "path": smollm2_dir}}
    )
    s = settings.model_copy(update={"catalog_path": catalog})
    client = Client(s, redis, store)
    job_id = client.submit(
        {
            "kind": "chat.completion",
            "model": "smollm2-135m",
            "request_id": "e2e-1",
            "input": {
                "messages": [{"role": "user", "content": QUESTION}],
                "temperature": 0,
                "max_tokens": 32,
            },
        }
    )
    make_worker(catalog_path=catalog).work(burst=True)
    doc = client.wait(job_id, timeout_s=5)
    assert doc["status"] == "completed", doc.get("error")
    result = doc["result"]
    assert result["object"] == "chat.completion"
    assert "Paris" in result["choices"][0]["message"]["content"]
    m = doc["metrics"]
    for key in (
        "queue_wait_ms",
        "load_ms",
        "inference_ms",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_s",
    ):
        assert m[key] > 0, key
    assert m["prompt_tokens"] == result["usage"]["prompt_tokens"]
    assert doc["created_at"] <= doc["started_at"] <= doc["finished_at"]


def _embedded_client(tmp_path: Path, redis_url: str, catalog: Path) -> Client:
    s = Settings(
        redis_url=redis_url, data_dir=tmp_path / "data", catalog_path=catalog, _env_file=None
    )  # type: ignore[call-arg]
    return Client(s, Redis.from_url(redis_url), connect_store(s))


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "mlx_fusion", "worker", "--burst"],
        [
            "-m",
            "rq.cli",
            "worker",
            "-w",
            "mlx_fusion.worker.FusionWorker",
            "-S",
            "rq.serializers.JSONSerializer",
            "--burst",
            "fusion:high",
            "fusion:default",
            "fusion:low",
        ],
    ],
    ids=["mlx-fusion-worker", "rq-worker"],
)
def test_worker_process_on_the_embedded_store(
    args: list[str], tmp_path: Path, redis: Redis, redis_url: str, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "models.toml", {TINY_MODEL: {"kind": "lm", "path": tiny_model_dir}}
    )
    client = _embedded_client(tmp_path, redis_url, catalog)
    ok = client.submit(
        {"kind": "completion", "model": TINY_MODEL, "input": {"prompt": "the cat", "max_tokens": 2}}
    )
    bad = client.submit({"kind": "completion", "model": "nope", "input": {"prompt": "x"}})
    if "rq.cli" in args:
        args = [*args, "--url", redis_url]
    proc = run_python(fusion_env(tmp_path, redis_url, catalog), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert client.get(ok)["status"] == "completed"
    assert client.get(bad)["error"], proc.stderr[-4000:]["code"] == "model_not_found"


def test_cli_submit_get_and_jobs(
    tmp_path: Path, redis: Redis, redis_url: str, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "models.toml", {TINY_MODEL: {"kind": "lm", "path": tiny_model_dir}}
    )
    env = fusion_env(tmp_path, redis_url, catalog)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_python(env, "-m", "mlx_fusion", *args)

    submitted = cli("submit", "--model", TINY_MODEL, "--prompt", "hello", "--max-tokens", "2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    bad = cli("submit", "--model", TINY_MODEL, "--prompt", "hi", "--temperature", "9")
    assert bad.returncode == 2 and "invalid_input" in bad.stderr
    assert cli("worker", "--burst").returncode == 0
    got = cli("get", job_id)
    assert got.returncode == 0 and '"status": "completed"' in got.stdout
    listed = cli("jobs", "--status", "completed")
    assert job_id in listed.stdout
    assert cli("get", "no-such-job").returncode == 1


def test_worker_refuses_to_start_on_a_broken_catalog(tmp_path: Path, redis_url: str) -> None:
    catalog = tmp_path / "models.toml"
    catalog.write_text('[models.a]\nkind = "lm"\npath = "x"\naliases = ["a"]\n')
    proc = run_python(
        fusion_env(tmp_path, redis_url, catalog), "-m", "mlx_fusion", "worker", "--burst"
    )
    assert proc.returncode == 2
    assert "catalog_invalid" in proc.stderr and str(catalog) in proc.stderr


WORKER_SCRIPT = """
import json, sys
from mlx_fusion.config import Settings
from mlx_fusion.worker import FusionWorker
from mlx_fusion.client import Client
from mlx_fusion.jobs import connect_store

if __name__ == "__main__":
    settings = Settings()
    worker = FusionWorker(settings=settings)
    client = Client(settings, worker.connection, worker.runner.store)
    job_id = client.submit({"kind": "completion", "model": "tiny-llama",
                            "input": {"prompt": "hi", "max_tokens": 2}})
    worker.work(burst=True)
    print(json.dumps({"status": client.get(job_id)["status"],
                      "mlx_in_worker": any(m.split(".")[0] in ("mlx", "mlx_lm")
                                           for m in sys.modules)}))
"""


def test_the_worker_process_never_imports_mlx(
    tmp_path: Path, redis: Redis, redis_url: str, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "models.toml", {TINY_MODEL: {"kind": "lm", "path": tiny_model_dir}}
    )
    script = tmp_path / "worker_script.py"
    script.write_text(WORKER_SCRIPT)
    proc = run_python(fusion_env(tmp_path, redis_url, catalog), str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"status": "completed", "mlx_in_worker": False}


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path) -> None:
    """A Hugging Face cache entry laid out as huggingface_hub writes it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(model_dir, repo / "snapshots" / ("0" * 40))


def test_hub_ids_come_from_the_local_cache_only(
    tmp_path: Path, redis: Redis, redis_url: str, tiny_model_dir: Path
) -> None:
    hub_cache = tmp_path / "hf-cache"
    _fake_hub_cache(hub_cache, "org/listed-model", tiny_model_dir)
    _fake_hub_cache(hub_cache, "org/unlisted-model", tiny_model_dir)
    catalog = tmp_path / "models.toml"
    catalog.write_text('[models.listed]\nkind = "lm"\nhub = "org/listed-model"\n')
    env = fusion_env(
        tmp_path,
        redis_url,
        catalog,
        FUSION_ALLOW_CACHED_HUB_MODELS="true",
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
    )
    client = _embedded_client(tmp_path, redis_url, catalog)
    jobs = {
        name: client.submit(
            {"kind": "completion", "model": name, "input": {"prompt": "x", "max_tokens": 1}}
        )
        for name in ("listed", "org/unlisted-model", "org/not-cached")
    }
    proc = run_python(env, "-m", "mlx_fusion", "worker", "--burst")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert client.get(jobs["listed"])["status"] == "completed"
    assert client.get(jobs["org/unlisted-model"])["status"] == "completed"
    assert client.get(jobs["org/not-cached"])["error"]["code"] == "model_not_found"
    catalog.write_text('[models.gone]\nkind = "lm"\nhub = "org/not-cached"\n')
    refused = run_python(env, "-m", "mlx_fusion", "worker", "--burst")
    assert refused.returncode == 2 and "field 'hub'" in refused.stderr
