"""What an operator sees of a real worker: ``/metrics`` and ``/healthz``, JSON logs, and the
``status``, ``models``, ``stats`` and ``health`` commands.

One GPU worker process (``mlx-fusion worker``, tiny random-weight llamas in model processes, the
embedded store in the data dir) on a redis-server of this module's own (with a password, which
must never reach a log line) runs a fixed mix of jobs once; the tests read what it exports.
The last tests stop the worker and Redis to see health change, so they run last.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    REPO,
    RedisServer,
    fusion_env,
    settings_from_env,
    stop_process,
    unused_port,
    wait_for,
    write_catalog,
)
from deploy_helpers import dashboard_metric_names
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from mlx_fusion.client import Client
from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.jobs.document import FINAL_STATUSES
from mlx_fusion.webhooks.signing import generate_secret

REDIS_PASSWORD = "Op3rations-Redis-Pw-7731"
WEBHOOK_SECRET = generate_secret()
NAMED_SECRET = generate_secret()
HEALTH_MAX_AGE_S = 3.0
MODEL_A, MODEL_B, BROKEN = "tiny-a", "tiny-b", "broken"
JOB_FIELDS = ("job_id", "request_id", "model", "kind", "worker")


@dataclass
class Scenario:
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    port: int
    redis_server: RedisServer
    stderr: Path
    worker: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Final records by job name."""

    def scrape(self) -> dict[str, Any]:
        """``/metrics`` as {family name: family}."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def healthz(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5)

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mlx_fusion", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.stderr.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                lines.append(event)
        return lines


JOBS: dict[str, dict[str, Any]] = {
    # model A loads; B evicts it (one model at a time); A again evicts B
    "a1": {"kind": "chat.completion", "model": MODEL_A, "input": {"max_tokens": 5}},
    "a2": {"kind": "chat.completion", "model": "alias-a", "input": {"max_tokens": 7}},
    "b1": {"kind": "completion", "model": MODEL_B, "input": {"prompt": "Hi", "max_tokens": 4}},
    "broken": {"kind": "completion", "model": BROKEN, "input": {"prompt": "Hi"}},
    "a3": {"kind": "completion", "model": MODEL_A, "input": {"prompt": "Yo", "max_tokens": 3}},
}
INVALID = {
    "kind": "chat.completion",
    "model": MODEL_A,
    "input": {"messages": "not a list"},
    "metadata": {"note": "private-note-not-for-logs"},
}


def _document(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = dict(spec["input"])
    if spec["kind"] == "chat.completion":
        body["messages"] = [{"role": "user", "content": f"Say {name}"}]
    return {**spec, "input": body, "request_id": f"req-{name}", "metadata": {"name": name}}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("ops")
    server = RedisServer(tmp / "redis", "--save", "", "--appendonly", "no", password=REDIS_PASSWORD)
    server.start()
    broken_dir = tmp / "broken-model"
    broken_dir.mkdir()
    (broken_dir / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    catalog = write_catalog(
        tmp / "models.toml",
        {
            MODEL_A: {"kind": "lm", "path": tiny_model_dir, "aliases": ["alias-a"]},
            MODEL_B: {"kind": "lm", "path": tiny_model_dir},
            BROKEN: {"kind": "lm", "path": broken_dir},
        },
    )
    port = unused_port()
    env = fusion_env(
        tmp,
        server.url,
        catalog,
        FUSION_METRICS_PORT=str(port),
        FUSION_LOG_FORMAT="json",
        FUSION_MAX_LOADED_MODELS="1",
        FUSION_SCHEDULE_LOOKAHEAD="0",  # arrival order: the loads and evictions counted below
        FUSION_RECOVERY_INTERVAL_S="1",
        FUSION_HEARTBEAT_INTERVAL_S="0.5",
        FUSION_HEALTH_MAX_AGE_S=str(HEALTH_MAX_AGE_S),
        FUSION_REDIS_RETRY_S="1",
        FUSION_WEBHOOK_SECRETS=WEBHOOK_SECRET,
        FUSION_WEBHOOK_NAMED_SECRETS=json.dumps({"tier2": [NAMED_SECRET]}),
        FUSION_WORKER_NAME="ops-gpu-0",
    )
    env.pop("FUSION_MONGO_URL", None)  # the embedded store, shared with this process
    stderr = tmp / "worker.log"
    settings = _settings(env)
    redis = Redis.from_url(server.url)
    client = Client(settings, redis, connect_store(settings))
    ids = {name: client.submit(_document(name, spec)) for name, spec in JOBS.items()}
    # an invalid document reaches the worker only through the raw queue (submit refuses it)
    from rq import Queue
    from rq.serializers import JSONSerializer

    Queue(settings.queue_name("default"), connection=redis, serializer=JSONSerializer).enqueue_call(
        "mlx_fusion.worker.run_job",
        args=({**INVALID, "request_id": "req-invalid"},),
        job_id="invalid-job",
    )
    ids["invalid"] = "invalid-job"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_fusion", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp,
        )
    scenario = Scenario(env, proc, port, server, stderr, "ops-gpu-0")
    try:
        store = client.store

        def finished() -> bool:
            docs = {name: store.get(i) for name, i in ids.items()}
            return all(d is not None and d.get("status") in FINAL_STATUSES for d in docs.values())

        wait_for(finished, 240, "every job to finish")
        scenario.records = {name: store.get(i) or {} for name, i in ids.items()}
        wait_for(lambda: _answers(scenario), 30, "the metrics endpoint")
        yield scenario
    finally:
        stop_process(proc, 30)
        server.stop()


def _settings(env: dict[str, str]) -> Any:
    """The worker's settings here (JSON-valued variables are the subprocess's business)."""
    return settings_from_env({k: v for k, v in env.items() if "NAMED_SECRETS" not in k})


def _answers(scenario: Scenario) -> bool:
    try:
        return scenario.healthz().status_code in (200, 503)
    except httpx.HTTPError:
        return False


def _samples(family: Any, **labels: str) -> list[Any]:
    return [
        s
        for s in family.samples
        if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")
    ]


def _value(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    family = families[name]
    found = [s for s in _samples(family, **labels) if s.name == name + suffix]
    assert len(found) == 1, (name, suffix, labels, family.samples)
    return float(found[0].value)


# ----- the scenario itself -------------------------------------------------------------------


def test_the_scenario_ends_each_job_as_designed(scenario: Scenario) -> None:
    statuses = {name: r["status"] for name, r in scenario.records.items()}
    assert statuses == {
        "a1": "completed",
        "a2": "completed",
        "b1": "completed",
        "broken": "failed",
        "a3": "completed",
        "invalid": "failed",
    }
    assert scenario.records["broken"]["error"]["code"] == "model_load_failed"
    assert scenario.records["invalid"]["error"]["code"] == "invalid_input"


# ----- /metrics ------------------------------------------------------------------------------


def test_jobs_total_counts_each_job_by_kind_model_and_final_status(scenario: Scenario) -> None:
    families = scenario.scrape()
    samples = _samples(families["fusion_jobs"])
    counted = {
        (s.labels["kind"], s.labels["model"], s.labels["status"]): s.value
        for s in samples
        if s.name == "fusion_jobs_total"
    }
    assert counted == {
        ("chat.completion", MODEL_A, "completed"): 2,  # the alias counts as its model
        ("completion", MODEL_B, "completed"): 1,
        ("completion", MODEL_A, "completed"): 1,
        ("completion", BROKEN, "failed"): 1,
        ("chat.completion", MODEL_A, "failed"): 1,  # invalid input, model known
    }
    assert all(s.labels["worker"] == scenario.worker for s in samples)


def test_latency_histograms_count_every_completed_job(scenario: Scenario) -> None:
    families = scenario.scrape()
    for name in ("fusion_job_queue_wait_seconds", "fusion_job_inference_seconds"):
        assert _value(families, name, "_count", kind="chat.completion", model=MODEL_A) == 2
        assert _value(families, name, "_count", kind="completion", model=MODEL_B) == 1
    inference_s = sum(
        r["metrics"]["inference_ms"] / 1000
        for n, r in scenario.records.items()
        if n in ("a1", "a2")
    )
    measured = _value(
        families, "fusion_job_inference_seconds", "_sum", kind="chat.completion", model=MODEL_A
    )
    assert measured == pytest.approx(inference_s, rel=1e-6)


def test_tokens_generated_match_the_usage_of_the_results(scenario: Scenario) -> None:
    families = scenario.scrape()
    for kind, model, names in (
        ("chat.completion", MODEL_A, ("a1", "a2")),
        ("completion", MODEL_B, ("b1",)),
    ):
        usage = [scenario.records[n]["result"]["usage"] for n in names]
        made = sum(u["completion_tokens"] for u in usage)
        read = sum(u["prompt_tokens"] for u in usage)
        assert made > 0
        assert _value(families, "fusion_tokens_generated", "_total", kind=kind, model=model) == made
        assert _value(families, "fusion_prompt_tokens", "_total", kind=kind, model=model) == read


def test_model_loads_evictions_and_load_failures_are_counted(scenario: Scenario) -> None:
    families = scenario.scrape()
    assert _value(families, "fusion_model_loads", "_total", model=MODEL_A) == 2
    assert _value(families, "fusion_model_loads", "_total", model=MODEL_B) == 1
    assert _value(families, "fusion_model_load_seconds", "_count", model=MODEL_A) == 2
    # one model at a time: B evicts A, A evicts B
    assert _value(families, "fusion_model_evictions", "_total", reason="lru") == 2
    assert _value(families, "fusion_model_load_failures", "_total", model=BROKEN) == 1


def test_loaded_model_gauges_show_the_one_model_in_memory(scenario: Scenario) -> None:
    families = scenario.scrape()
    assert _value(families, "fusion_models_loaded") == 1
    sizes = _samples(families["fusion_model_bytes"])
    assert [s.labels["model"] for s in sizes] == [MODEL_A]
    assert sizes[0].value > 0
    assert _value(families, "fusion_memory_budget_bytes") >= sizes[0].value
    assert _value(families, "fusion_memory_used_bytes") == sizes[0].value


def test_device_memory_is_read_in_the_model_process_of_the_loaded_model(
    scenario: Scenario,
) -> None:
    families = scenario.scrape()
    for name in ("fusion_device_memory_active_bytes", "fusion_device_memory_peak_bytes"):
        samples = _samples(families[name])
        assert [s.labels["model"] for s in samples] == [MODEL_A]  # B's gauges left with it
        assert samples[0].value > 0
    assert _value(families, "fusion_device_memory_cache_bytes", model=MODEL_A) >= 0


def test_queue_depth_and_worker_state_are_exported(scenario: Scenario) -> None:
    families = scenario.scrape()
    queues = {s.labels["queue"]: s.value for s in _samples(families["fusion_queue_depth"])}
    assert queues == {"fusion:high": 0, "fusion:default": 0, "fusion:low": 0}
    assert _value(families, "fusion_worker_busy") == 0
    assert _value(families, "fusion_worker_info", version="0.1.0") == 1
    beat = _value(families, "fusion_worker_last_heartbeat_timestamp_seconds")
    assert time.time() - beat < HEALTH_MAX_AGE_S


def test_grafana_dashboard_queries_only_metrics_the_worker_exports(scenario: Scenario) -> None:
    exported = set(scenario.scrape())
    exported |= _webhook_families()
    queried = dashboard_metric_names(REPO / "deploy" / "grafana" / "mlx-fusion.json")
    # a family's name drops its _total; the dashboard names the series
    names = {n.removesuffix("_total") for n in queried}
    assert names <= exported, names - exported


def _webhook_families() -> set[str]:
    from mlx_fusion.metrics import WebhookMetrics

    metrics = WebhookMetrics("probe")
    return {f.name for f in metrics.registry.collect()}


def test_healthz_is_ok_while_the_worker_heartbeats(scenario: Scenario) -> None:
    answer = scenario.healthz()
    assert answer.status_code == 200
    body = answer.json()
    assert body["healthy"] is True and body["worker"] == scenario.worker
    assert body["heartbeat_age_s"] <= HEALTH_MAX_AGE_S


# ----- logs ----------------------------------------------------------------------------------


def test_every_log_line_of_a_job_carries_its_fields(scenario: Scenario) -> None:
    lines = scenario.log_lines()
    name_of = {record["id"]: name for name, record in scenario.records.items()}
    loggers: set[Any] = set()
    for name in ("a1", "b1", "broken", "invalid"):
        job_id = scenario.records[name]["id"]
        at = [i for i, e in enumerate(lines) if e.get("job_id") == job_id]
        assert at, f"no log line for {name}"
        # every line while the job runs carries a job's fields; jobs of one batch (a1 and a2)
        # log in turn, each line with its own job's id and request id
        for event in lines[at[0] : at[-1] + 1]:
            missing = [k for k in JOB_FIELDS if not event.get(k)]
            assert not missing, (name, missing, event)
            assert event["job_id"] in name_of and event["worker"] == scenario.worker
            assert event["request_id"] == f"req-{name_of[event['job_id']]}", event
        loggers |= {lines[i].get("logger") for i in at}
    assert "rq.worker" in loggers  # RQ's own lines go through the same handler
    model_lines = [e for e in lines if e["event"] == "model_job_done"]
    assert len(model_lines) == 4  # a1, a2, b1, a3 ran in model processes
    assert {e["request_id"] for e in model_lines} == {"req-a1", "req-a2", "req-b1", "req-a3"}
    assert all(
        e["worker"] == scenario.worker and e["pid"] != scenario.proc.pid for e in model_lines
    )


def test_no_secret_from_the_settings_reaches_the_log(scenario: Scenario) -> None:
    text = scenario.stderr.read_text(encoding="utf-8", errors="replace")
    assert "job_completed" in text  # the log is the worker's, and it logged
    for secret in (REDIS_PASSWORD, WEBHOOK_SECRET, NAMED_SECRET):
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text


def test_job_documents_are_not_logged(scenario: Scenario) -> None:
    text = scenario.stderr.read_text(encoding="utf-8", errors="replace")
    assert "Say a1" not in text
    # RQ describes a job enqueued without a description (raw Redis) by the call, document
    # included, and would log it
    assert "private-note-not-for-logs" not in text


# ----- status, models, stats -----------------------------------------------------------------


def test_status_json_shows_queues_the_worker_and_recent_failures(scenario: Scenario) -> None:
    done = scenario.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {q["name"]: q["depth"] for q in report["queues"]} == {
        "fusion:high": 0,
        "fusion:default": 0,
        "fusion:low": 0,
        "fusion:webhooks": 0,
    }
    (worker,) = report["workers"]
    assert worker["name"] == scenario.worker and worker["kind"] == "gpu"
    assert worker["state"] == "idle" and worker["current_job"] is None
    assert [m["id"] for m in worker["models"]] == [MODEL_A]
    assert worker["used_bytes"] > 0 and worker["budget_bytes"] >= worker["used_bytes"]
    assert BROKEN in worker["cooldowns"]  # its load failed; the next try waits
    assert [e["cause"] for e in worker["recent_evictions"]] == ["lru", "lru"]
    failed = {f["id"] for f in report["recent_failures"]}
    assert failed == {scenario.records["broken"]["id"], "invalid-job"}


def test_status_prints_a_table(scenario: Scenario) -> None:
    done = scenario.cli("status")
    assert done.returncode == 0, done.stderr
    assert scenario.worker in done.stdout and "fusion:default" in done.stdout


def test_models_json_lists_the_catalog_with_details_and_where_each_is_loaded(
    scenario: Scenario,
) -> None:
    done = scenario.cli("models", "--json")
    assert done.returncode == 0, done.stderr
    models = {m["id"]: m for m in json.loads(done.stdout)["models"]}
    assert set(models) == {MODEL_A, MODEL_B, BROKEN}
    a = models[MODEL_A]
    assert a["kind"] == "lm" and a["aliases"] == ["alias-a"]
    config = json.loads((Path(a["path"]) / "config.json").read_text())
    assert a["family"] == config["model_type"]
    assert a["context_length"] == config["max_position_embeddings"]
    assert a["size_on_disk_bytes"] == sum(
        p.stat().st_size for p in Path(a["path"]).rglob("*") if p.is_file()
    )
    assert a["workers"] == [scenario.worker]
    assert [w["worker"] for w in a["loaded_on"]] == [scenario.worker]
    assert a["loaded_on"][0]["state"] == "ready"
    assert models[MODEL_B]["loaded_on"] == []


def test_client_models_reads_what_the_workers_publish(scenario: Scenario) -> None:
    settings = _settings(scenario.env).model_copy(
        update={"catalog_path": Path("/nonexistent/models.toml")}
    )
    client = Client(settings, Redis.from_url(scenario.redis_server.url), connect_store(settings))
    assert [m["id"] for m in client.models()] == sorted([MODEL_A, MODEL_B, BROKEN])


def test_stats_counts_and_times_the_jobs_of_the_window(scenario: Scenario) -> None:
    done = scenario.cli("stats", "--since", "1h", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    groups = {(g["kind"], g["model"]): g for g in report["groups"]}
    chat_a = groups[("chat.completion", MODEL_A)]
    assert (chat_a["completed"], chat_a["failed"]) == (2, 1)
    assert groups[("completion", BROKEN)]["failed"] == 1
    assert report["total"]["count"] == 6 and report["total"]["completed"] == 4
    latencies = sorted(
        (scenario.records[n]["finished_at"] - scenario.records[n]["created_at"]).total_seconds()
        for n in ("a1", "a2")
    )
    assert chat_a["latency_s"]["p50"] == pytest.approx(latencies[0], abs=1e-3)
    assert chat_a["latency_s"]["p99"] == pytest.approx(latencies[1], abs=1e-3)
    human = scenario.cli("stats", "--since", "1h")
    assert human.returncode == 0 and MODEL_A in human.stdout


def test_wait_follows_a_finished_job_and_exits_by_its_status(scenario: Scenario) -> None:
    ok = scenario.cli("wait", scenario.records["a1"]["id"], "--timeout", "5")
    assert ok.returncode == 0, ok.stderr
    assert "completed" in ok.stderr
    failed = scenario.cli("wait", scenario.records["broken"]["id"], "--timeout", "5")
    assert failed.returncode == 1 and "model_load_failed" in failed.stderr


# ----- health changes (these stop the worker and Redis: they run last) ----------------------


def test_health_command_fails_while_the_worker_stops_heartbeating(scenario: Scenario) -> None:
    def health() -> subprocess.CompletedProcess[str]:
        return scenario.cli("health", "--worker", scenario.worker, "--json")

    first = health()
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(first.stdout)["healthy"] is True
    scenario.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(HEALTH_MAX_AGE_S + 1.5)
        stale = health()
        assert stale.returncode == 1, stale.stdout
        assert json.loads(stale.stdout)["workers"][0]["healthy"] is False
    finally:
        scenario.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: health().returncode == 0, 20, "health to come back")
    missing = scenario.cli("health", "--worker", "no-such-worker")
    assert missing.returncode == 1


def test_healthz_answers_503_while_heartbeats_cannot_reach_redis(scenario: Scenario) -> None:
    assert scenario.healthz().status_code == 200
    scenario.redis_server.stop()
    try:
        wait_for(lambda: scenario.healthz().status_code == 503, 30, "/healthz to turn 503")
        body = scenario.healthz().json()
        assert body["healthy"] is False and body["heartbeat_age_s"] > HEALTH_MAX_AGE_S
        down = scenario.cli("health", "--worker", scenario.worker)
        assert down.returncode == 2  # the check itself cannot read Redis
    finally:
        scenario.redis_server.start()
    wait_for(lambda: scenario.healthz().status_code == 200, 60, "/healthz to recover")
    assert scenario.proc.poll() is None  # the worker rode it out
    # this Redis kept nothing: the worker registers again, so status and health see it
    wait_for(
        lambda: scenario.cli("health", "--worker", scenario.worker).returncode == 0,
        30,
        "the worker to register again",
    )
    assert "worker_registered_again" in scenario.stderr.read_text(encoding="utf-8")


def test_log_redaction_replaces_secrets_anywhere_in_an_event() -> None:
    import io
    import logging

    import structlog

    from mlx_fusion import logs

    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure("json", "INFO", secrets=[REDIS_PASSWORD], stream=out)
    try:
        structlog.get_logger("t").info(
            "connecting", url=f"redis://:{REDIS_PASSWORD}@h:1/0", nested={"k": [REDIS_PASSWORD]}
        )
        logging.getLogger("rq.worker").warning("failed with %s", REDIS_PASSWORD)
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = handlers, level
    text = out.getvalue()
    assert REDIS_PASSWORD not in text
    assert text.count(logs.REDACTED) == 3


def test_secrets_of_settings_include_url_passwords_and_webhook_secrets() -> None:
    from mlx_fusion import logs
    from mlx_fusion.config import Settings

    settings = Settings(
        redis_url=f"redis://user:{REDIS_PASSWORD}@h:6379/0",
        mongo_url="mongodb://u:m0ngo-Pass%2Fword@h1,h2/db",
        webhook_secrets=WEBHOOK_SECRET,
        _env_file=None,  # type: ignore[call-arg]
    )
    found = logs.secrets_of(settings)
    assert REDIS_PASSWORD in found
    assert "m0ngo-Pass/word" in found and "m0ngo-Pass%2Fword" in found
    assert WEBHOOK_SECRET in found and WEBHOOK_SECRET.removeprefix("whsec_") in found


def test_queue_gauges_show_waiting_jobs_and_the_age_of_the_oldest(
    make_worker: Any, client: Client
) -> None:
    from prometheus_client import generate_latest

    worker = make_worker()
    try:
        for _ in range(3):
            client.submit({"kind": "completion", "model": "tiny", "input": {"prompt": "x"}})
        time.sleep(0.3)
        text = generate_latest(worker.metrics.registry).decode()
    finally:
        worker.runner.registry.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert _value(families, "fusion_queue_depth", queue="fusion:default") == 3
    assert _value(families, "fusion_queue_depth", queue="fusion:high") == 0
    assert _value(families, "fusion_queue_oldest_age_seconds", queue="fusion:default") >= 0.3
    assert _value(families, "fusion_queue_oldest_age_seconds", queue="fusion:high") == 0


def test_client_models_describes_the_local_catalog_when_no_worker_runs(client: Client) -> None:
    (model,) = client.models()
    assert model["id"] == "tiny-llama" and model["aliases"] == ["tiny"]
    assert model["family"] == "llama" and model["workers"] == [] and model["loaded_on"] == []


def _register(redis: Redis, name: str, *, pid: int, heartbeat_age_s: float) -> None:
    from rq import Queue as RQQueue
    from rq import SimpleWorker
    from rq.utils import now, utcformat

    worker = SimpleWorker(
        [RQQueue("fusion:default", connection=redis)], name=name, connection=redis
    )
    worker.register_birth()
    redis.hset(worker.key, "pid", pid)
    beat = now().timestamp() - heartbeat_age_s
    redis.hset(worker.key, "last_heartbeat", utcformat(dt.datetime.fromtimestamp(beat, dt.UTC)))


def test_health_of_this_host_skips_registrations_whose_process_is_gone(
    redis: Redis, redis_url: str
) -> None:
    from typer.testing import CliRunner

    from mlx_fusion.cli import app

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(ended.stdout)
    _register(redis, "live", pid=os.getpid(), heartbeat_age_s=0.5)
    _register(redis, "crashed", pid=dead_pid, heartbeat_age_s=60)
    env = {"FUSION_REDIS_URL": redis_url, "FUSION_HEALTH_MAX_AGE_S": "10"}
    runner = CliRunner()
    done = runner.invoke(app, ["health", "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert [w["name"] for w in json.loads(done.output)["workers"]] == ["live"]
    # the same stale registration with a live process is an unhealthy worker
    redis.hset("rq:worker:crashed", "pid", os.getpid())
    stale = runner.invoke(app, ["health", "--json"], env=env)
    assert stale.exit_code == 1
    assert {w["name"]: w["healthy"] for w in json.loads(stale.output)["workers"]} == {
        "live": True,
        "crashed": False,
    }


def test_a_submitted_job_leaves_rqs_failed_registry_with_its_record(
    client: Client, redis: Redis
) -> None:
    from rq.job import Job as RQJob
    from rq.serializers import JSONSerializer

    job_id = client.submit({"kind": "completion", "model": "tiny", "input": {"prompt": "x"}})
    rq_job = RQJob.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert rq_job.failure_ttl == client.settings.retention_days * 86400
