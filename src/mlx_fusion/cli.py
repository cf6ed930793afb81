"""``mlx-fusion``: run a worker, submit and inspect jobs, or run the whole path once (``demo``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mlx_fusion.config import Settings
from mlx_fusion.errors import FusionError
from mlx_fusion.progress import progress

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DEMO_QUESTION = "What is the capital of France? Answer in one sentence."
DEMO_MODEL = "smollm2-135m"
control_action = Literal["load", "unload"]


def configure_logging(settings: Settings, json_logs: bool = False) -> None:
    """Logs to stderr as the settings say (``--json-logs`` forces JSON lines)."""
    from mlx_fusion import logs

    logs.configure_from(settings, json_logs=json_logs)


def _json_default(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=_json_default))


def _fail(error: FusionError) -> None:
    typer.echo(f"error [{error.code}]: {error.message}", err=True)
    raise typer.Exit(2)


def _client(settings: Settings) -> Any:
    from mlx_fusion.client import Client
    from mlx_fusion.jobs import connect_store
    from mlx_fusion.services import redis_connection

    return Client(settings, redis_connection(settings), connect_store(settings))


def _with_redis(settings: Settings, stack: ExitStack) -> Settings:
    """Settings with a Redis URL: the configured one, or a throwaway local redis-server that
    lives as long as ``stack``."""
    if settings.redis_url is not None:
        return settings
    from mlx_fusion.services import EmbeddedRedis

    embedded = EmbeddedRedis(settings)
    url = embedded.start()
    stack.callback(embedded.stop)
    return settings.model_copy(update={"redis_url": url})


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Quit when the queues are empty.")] = False,
    max_jobs: Annotated[int | None, typer.Option(help="Quit after this many jobs.")] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
    gpus: Annotated[
        str | None,
        typer.Option(
            envvar="FUSION_GPUS",
            help="One worker process per NVIDIA GPU: 'all' (as nvidia-smi lists them) or "
            "indices like 0,1. Each sees only its GPU (CUDA_VISIBLE_DEVICES), is named "
            "<FUSION_WORKER_NAME or host>.gpu<N>, serves metrics on FUSION_METRICS_PORT "
            "(GPU 0) or that + 1 + N, and is restarted if it dies; SIGTERM stops them all.",
        ),
    ] = None,
) -> None:
    """Run a GPU worker on the high, default and low queues (in that order); with --gpus, one per
    GPU under a supervisor."""
    settings = Settings()
    configure_logging(settings, json_logs)
    if gpus is not None:
        _supervise_gpus(settings, gpus, burst=burst, max_jobs=max_jobs, json_logs=json_logs)
        return
    from mlx_fusion.worker import FusionWorker

    with ExitStack() as stack:
        settings = _with_redis(settings, stack)
        try:
            fusion_worker = FusionWorker(settings=settings)
            fusion_worker.work(burst=burst, max_jobs=max_jobs, logging_level=settings.log_level)
        except FusionError as e:
            _fail(e)


def _supervise_gpus(
    settings: Settings, text: str, *, burst: bool, max_jobs: int | None, json_logs: bool
) -> None:
    from mlx_fusion.gpus import (
        GpuSelectionError,
        GpuSupervisor,
        detect_gpus,
        parse_gpus,
        worker_command,
    )

    try:
        selected = parse_gpus(text)
    except GpuSelectionError as e:
        raise typer.BadParameter(str(e), param_hint="'--gpus' / FUSION_GPUS") from e
    try:
        gpus = detect_gpus() if selected == "all" else selected
    except GpuSelectionError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    with ExitStack() as stack:
        embedded = settings.redis_url is None
        try:
            settings = _with_redis(settings, stack)
        except FusionError as e:
            _fail(e)
        supervisor = GpuSupervisor(
            settings,
            gpus,
            worker_command(burst=burst, max_jobs=max_jobs, json_logs=json_logs),
            redis_url=settings.redis_url if embedded else None,
        )
        code = supervisor.run()
    if code != 0:
        raise typer.Exit(code)


@app.command()
def submit(
    file: Annotated[Path | None, typer.Argument(help="A job document (JSON); '-' = stdin.")] = None,
    kind: Annotated[str, typer.Option(help="chat.completion or completion")] = "chat.completion",
    model: Annotated[str | None, typer.Option(help="Catalog id or alias.")] = None,
    prompt: Annotated[str | None, typer.Option(help="The user message / prompt.")] = None,
    max_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    priority: Annotated[str, typer.Option()] = "default",
    wait: Annotated[float | None, typer.Option(help="Wait this many seconds for the end.")] = None,
) -> None:
    """Submit a job from a JSON file or from flags; prints its id (or, with --wait, the job)."""
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        try:
            document: dict[str, Any] = json.loads(text)
        except ValueError as e:
            typer.echo(f"error [invalid_job]: {file} is not JSON: {e}", err=True)
            raise typer.Exit(2) from e
    else:
        if model is None or prompt is None:
            typer.echo("error: give a JSON file, or --model and --prompt", err=True)
            raise typer.Exit(2)
        body: dict[str, Any] = (
            {"messages": [{"role": "user", "content": prompt}]}
            if kind == "chat.completion"
            else {"prompt": prompt}
        )
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        document = {"kind": kind, "model": model, "input": body, "priority": priority}
    settings = Settings()
    try:
        client = _client(settings)
        job_id = client.submit(document)
        if wait is None:
            typer.echo(job_id)
            return
        _print(client.wait(job_id, wait))
    except FusionError as e:
        _fail(e)
    except TimeoutError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def get(job_id: str) -> None:
    """Print one job document."""
    try:
        record = _client(Settings()).get(job_id)
    except FusionError as e:
        _fail(e)
    if record is None:
        typer.echo(f"error: no job {job_id}", err=True)
        raise typer.Exit(1)
    _print(record)


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    since: Annotated[dt.datetime | None, typer.Option(help="Created at or after (UTC).")] = None,
    limit: Annotated[int, typer.Option()] = 20,
) -> None:
    """List jobs, newest first, one line each."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    try:
        records = _client(Settings()).list(status=status, model=model, since=since, limit=limit)
    except FusionError as e:
        _fail(e)
    for r in records:
        code = (r.get("error") or {}).get("code", "")
        typer.echo(
            f"{r['id']}  {r.get('status', ''):<10} {r.get('model', ''):<24} "
            f"{r.get('created_at', '')}  {code}"
        )


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued or running job (a running one stops within seconds)."""
    try:
        client = _client(Settings())
        done = client.cancel(job_id)
        record = client.get(job_id) if done else None
    except FusionError as e:
        _fail(e)
    if not done:
        typer.echo("not cancelled: the job is unknown or already finished")
        raise typer.Exit(1)
    running = record is not None and record.get("status") == "processing"
    typer.echo("cancellation requested: the worker stops the job" if running else "cancelled")


@app.command()
def demo(
    timeout_s: Annotated[float, typer.Option(help="How long to wait for the answer.")] = 600,
) -> None:
    """The whole path once: a worker process answers a real chat job with SmolLM2-135M.

    Uses the configured Redis and MongoDB, or (unset) a throwaway local redis-server and the
    embedded single-host job store in the data directory.
    """
    from mlx_fusion.gguf import ensure_smollm2

    settings = Settings()
    configure_logging(settings)
    models_dir = settings.data_dir / "models"
    with progress("demo model") as show:
        model_dir = ensure_smollm2(models_dir, progress=show)
    catalog = models_dir / "demo-catalog.toml"
    catalog.write_text(
        f'[models.{DEMO_MODEL}]\nkind = "lm"\npath = "{model_dir}"\naliases = ["smollm2"]\n',
        encoding="utf-8",
    )
    with ExitStack() as stack:
        settings = _with_redis(settings, stack)
        settings = settings.model_copy(update={"catalog_path": catalog})
        client = _client(settings)
        job_id = client.submit(
            {
                "kind": "chat.completion",
                "model": DEMO_MODEL,
                "input": {
                    "messages": [{"role": "user", "content": DEMO_QUESTION}],
                    "temperature": 0,
                    "max_tokens": 48,
                },
                "metadata": {"source": "mlx-fusion demo"},
            }
        )
        typer.echo(f"submitted job {job_id}; starting a worker process (burst mode)", err=True)
        env = {
            **os.environ,
            "FUSION_REDIS_URL": settings.redis_url or "",
            "FUSION_CATALOG_PATH": str(catalog),
            "FUSION_DATA_DIR": str(settings.data_dir),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_fusion", "worker", "--burst"], env=env, check=False
        )
        record = client.wait(job_id, timeout_s)
    _print(
        {
            k: record.get(k)
            for k in (
                "id",
                "status",
                "result",
                "error",
                "metrics",
                "worker",
                "created_at",
                "started_at",
                "finished_at",
            )
        }
    )
    if record.get("status") != "completed" or proc.returncode != 0:
        raise typer.Exit(1)
    answer = record["result"]["choices"][0]["message"]["content"]
    typer.echo(f"\nQ: {DEMO_QUESTION}\nA: {answer.strip()}", err=True)


models_app = typer.Typer(help="The model catalog and what each worker has loaded.")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the models the running workers serve (or the local catalog when none runs), with
    their details and where each is loaded."""
    if ctx.invoked_subcommand is not None:
        return
    settings = Settings()
    try:
        found = _client(settings).models()
    except FusionError as e:
        _fail(e)
    if json_out:
        _print({"models": found})
        return
    for m in found:
        quant = m.get("quantization") or {}
        details = [
            m.get("family") or "?",
            f"ctx {m['context_length']}" if m.get("context_length") else "",
            f"q{quant['bits']}" if quant.get("bits") else "",
            f"{m['size_on_disk_bytes'] / 1e6:.1f} MB" if m.get("size_on_disk_bytes") else "",
        ]
        where = [
            f"{w['worker']} ({w['state']}, {(w.get('bytes') or 0) / 1e6:.1f} MB, "
            f"in use {w['in_use']})"
            for w in m["loaded_on"]
        ]
        flags = " pinned" if m.get("pinned") else ""
        typer.echo(
            f"{m['id']:<28} {m['kind']:<18}{flags} {' '.join(d for d in details if d):<32} "
            + ("; ".join(where) or "-")
        )


def _command(action: control_action, model_id: str, worker: str | None, wait: float) -> None:
    from mlx_fusion import control
    from mlx_fusion.services import redis_connection

    settings = Settings()
    try:
        redis = redis_connection(settings)
    except FusionError as e:
        _fail(e)
    prefix = settings.queue_prefix
    targets = [worker] if worker else control.workers(redis, prefix)
    if not targets:
        typer.echo("error: no running worker", err=True)
        raise typer.Exit(1)
    sent = {name: control.send_command(redis, prefix, name, action, model_id) for name in targets}
    deadline = time.monotonic() + wait
    results: dict[str, Any] = {}
    with progress(f"{action} {model_id}") as show:
        show.step(f"sent to {len(sent)} worker(s)")
        while wait > 0 and len(results) < len(sent) and time.monotonic() < deadline:
            for name, command_id in sent.items():
                snap = control.read_snapshot(redis, prefix, name) or {}
                for done in snap.get("commands", []):
                    if done.get("id") == command_id and name not in results:
                        results[name] = done
                        show.step(f"{name}: {done['status']}")
            show.tick(f"waiting for {len(sent) - len(results)} worker(s)")
            time.sleep(0.2)
    failed = False
    for name in sent:
        done = results.get(name)
        status = done["status"] if done else ("sent" if wait <= 0 else "no answer")
        detail = f": {done['error']}" if done and done.get("error") else ""
        typer.echo(f"{name}: {action} {model_id}: {status}{detail}")
        failed = failed or status in ("failed", "refused", "no answer")
    if failed:
        raise typer.Exit(1)


@models_app.command("load")
def models_load(
    model_id: str,
    worker: Annotated[str | None, typer.Option(help="One worker (default: all).")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 60,
) -> None:
    """Load a model on running workers (applied between jobs)."""
    _command("load", model_id, worker, wait)


@models_app.command("unload")
def models_unload(
    model_id: str,
    worker: Annotated[str | None, typer.Option(help="One worker (default: all).")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 60,
) -> None:
    """Unload a model on running workers (a model in use unloads when its job ends)."""
    _command("unload", model_id, worker, wait)


@models_app.command("import")
def models_import(
    source: Annotated[Path, typer.Argument(help="A GGUF file or a CTranslate2 whisper folder.")],
    out_dir: Annotated[Path, typer.Argument(help="The MLX model directory to write.")],
) -> None:
    """Import a llama-family GGUF file or a CTranslate2 whisper model as an MLX model directory
    (then name it in the catalog)."""
    from mlx_fusion.model_import import import_model

    try:
        with progress(f"import {source.name}") as show:
            fmt, written = import_model(source, out_dir, progress=show)
    except FusionError as e:
        _fail(e)
    kind = "lm" if fmt == "gguf" else "whisper"
    typer.echo(f"imported {source} ({fmt}) into {written}")
    typer.echo(f'catalog entry:\n[models.{written.name}]\nkind = "{kind}"\npath = "{written}"')


def _duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError) as e:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h or 2d") from e


@app.command()
def status(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Queues (depth, oldest job), workers (state, current job, loaded models, memory) and the
    latest failures."""
    from mlx_fusion import inspect
    from mlx_fusion.jobs import connect_store
    from mlx_fusion.jobs.store import utcnow
    from mlx_fusion.services import redis_connection

    settings = Settings()
    _report(
        lambda: inspect.status(
            redis_connection(settings), settings, connect_store(settings), utcnow()
        ),
        inspect.render_status,
        json_out,
    )


def _report(read: Any, render: Any, json_out: bool) -> None:
    """Print ``read()`` as JSON or through ``render``; a store or Redis error exits 2."""
    try:
        report = read()
    except FusionError as e:
        _fail(e)
    if json_out:
        _print(report)
    else:
        typer.echo(render(report))


@app.command()
def stats(
    since: Annotated[str, typer.Option(help="Window length back from now: 90s, 15m, 1h, 2d.")] = (
        "1h"
    ),
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Throughput and latency p50/p95/p99 per kind and model over a window, from the job store."""
    from mlx_fusion import inspect
    from mlx_fusion.jobs import connect_store
    from mlx_fusion.jobs.store import utcnow

    window_s = _duration_s(since)
    if window_s <= 0:
        raise typer.BadParameter("the window must be longer than 0 s", param_hint="--since")
    settings = Settings()
    until = utcnow()
    since_at = until - dt.timedelta(seconds=window_s)
    _report(
        lambda: inspect.job_stats(connect_store(settings), since_at, until),
        inspect.render_stats,
        json_out,
    )


@app.command()
def health(
    worker: Annotated[
        str | None, typer.Option(help="This worker (default: every worker on this host).")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only workers of this kind: gpu or webhook.")
    ] = None,
    max_age: Annotated[
        float | None,
        typer.Option(help="Heartbeat age limit in s (default: health_max_age_s or the TTL)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Exit 0 when the worker heartbeats (for launchd, systemd and container health checks):
    every matching worker must have heartbeated within the limit, and at least one must match
    (registrations of this host whose process is gone are skipped). Exit 1 otherwise, 2 when
    Redis cannot be read."""
    import socket

    from mlx_fusion import inspect
    from mlx_fusion.jobs.store import utcnow
    from mlx_fusion.services import redis_connection

    settings = Settings()
    # a health check answers within seconds: no long retries through a Redis restart
    quick = settings.model_copy(update={"redis_retry_s": min(settings.redis_retry_s, 3.0)})
    try:
        rows = inspect.worker_status(redis_connection(quick), settings, utcnow())
    except FusionError as e:
        _fail(e)
    except Exception as e:  # Redis unreachable: the health check itself cannot tell
        typer.echo(f"error: cannot read workers from Redis: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    host = socket.gethostname()
    matching = [
        r
        for r in rows
        if (r["name"] == worker if worker else r["hostname"] == host)
        and (kind is None or r["kind"] == kind)
        # a worker of this host whose process is gone was replaced (a restart after a crash);
        # its registration only waits to expire
        and not (r["hostname"] == host and not _process_exists(r["pid"]))
    ]
    checked = []
    for r in matching:
        limit = max_age or settings.health_max_age_s or settings.worker_ttl_s(r["kind"])
        age = r["heartbeat_age_s"]
        checked.append(
            {
                "name": r["name"],
                "kind": r["kind"],
                "state": r["state"],
                "heartbeat_age_s": age,
                "max_age_s": limit,
                "healthy": age is not None and age <= limit,
            }
        )
    healthy = bool(checked) and all(c["healthy"] for c in checked)
    if json_out:
        _print({"healthy": healthy, "workers": checked})
    elif not checked:
        typer.echo(f"unhealthy: no worker {'named ' + worker if worker else 'on ' + host}")
    for c in checked if not json_out else []:
        verdict = "healthy" if c["healthy"] else "unhealthy"
        typer.echo(
            f"{verdict}: {c['name']} ({c['kind']}, {c['state']}), last heartbeat "
            f"{c['heartbeat_age_s']} s ago (limit {c['max_age_s']:g} s)"
        )
    if not healthy:
        raise typer.Exit(1)


def _process_exists(pid: Any) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return True  # cannot tell: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command("wait")
def wait_command(
    job_id: str,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Give up after this long.")] = 600,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final job as JSON.")] = False,
) -> None:
    """Follow a job until it ends, showing each status change; exit 0 completed, 1 failed or
    cancelled, 3 still running at the timeout."""
    from mlx_fusion.jobs.document import FINAL_STATUSES

    settings = Settings()
    try:
        client = _client(settings)
    except FusionError as e:
        _fail(e)
    deadline = time.monotonic() + timeout_s
    seen: str | None = None
    with progress(f"job {job_id}") as show:
        while True:
            try:
                record = client.get(job_id)
            except FusionError as e:
                _fail(e)
            state = (record or {}).get("status") or "unknown"
            if state != seen:
                seen = state
                show.step(_describe_state(record, state))
            if state in FINAL_STATUSES or time.monotonic() >= deadline:
                break
            show.tick(state)
            time.sleep(0.2)
    if record is None:
        typer.echo(f"error: no job {job_id}", err=True)
        raise typer.Exit(1)
    if json_out:
        _print(record)
    if state not in FINAL_STATUSES:
        typer.echo(f"still {state} after {timeout_s:g} s", err=True)
        raise typer.Exit(3)
    if state != "completed":
        raise typer.Exit(1)


def _describe_state(record: dict[str, Any] | None, state: str) -> str:
    if record is None:
        return "not found (yet)"
    if state == "processing":
        return f"processing on {record.get('worker')} (attempt {record.get('attempts', 1)})"
    if state == "failed":
        error = record.get("error") or {}
        return f"failed [{error.get('code')}]: {error.get('message')}"
    metrics = record.get("metrics") or {}
    if state == "completed":
        spent = [
            f"{k}={metrics[k]:g}"
            for k in ("queue_wait_ms", "load_ms", "inference_ms")
            if isinstance(metrics.get(k), (int, float))
        ]
        return "completed " + " ".join(spent)
    return state


@app.command("webhook-worker")
def webhook_worker(
    burst: Annotated[bool, typer.Option(help="Quit when the queue is empty.")] = False,
    scheduler: Annotated[
        bool, typer.Option(help="Also run RQ's scheduler, which moves due retries to the queue.")
    ] = True,
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes: deliveries run one at a time in each.")
    ] = 1,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
) -> None:
    """Deliver completion webhooks (never touches MLX or a GPU); run one or more per Redis."""
    from mlx_fusion.webhooks.worker import WebhookWorker, run_pool

    settings = Settings()
    configure_logging(settings, json_logs)
    if not settings.webhook_secrets and not settings.webhook_named_secrets:
        typer.echo(
            "error: no webhook secret configured: set FUSION_WEBHOOK_SECRETS "
            "(`mlx-fusion webhooks new-secret` makes one)",
            err=True,
        )
        raise typer.Exit(2)
    try:
        if processes > 1:
            run_pool(settings, processes, scheduler=scheduler, burst=burst)
            return
        hook_worker = WebhookWorker(settings=settings)
        hook_worker.work(burst=burst, with_scheduler=scheduler, logging_level=settings.log_level)
    except FusionError as e:
        _fail(e)


@app.command("scheduler")
def scheduler_command(
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log JSON lines.")] = False,
) -> None:
    """Run RQ's scheduler alone for the job and webhook queues (no GPU, no fork)."""
    from rq.scheduler import RQScheduler
    from rq.serializers import JSONSerializer

    from mlx_fusion.services import redis_connection

    settings = Settings()
    configure_logging(settings, json_logs)
    try:
        connection = redis_connection(settings)
    except FusionError as e:
        _fail(e)
    names = [*settings.queue_names(), settings.webhook_queue_name()]
    rq_scheduler = RQScheduler(names, connection=connection, serializer=JSONSerializer)
    rq_scheduler.acquire_locks()  # type: ignore[no-untyped-call]
    rq_scheduler.work()  # type: ignore[no-untyped-call]


webhooks_app = typer.Typer(help="Webhook deliveries: replay, list failures, make a secret.")
app.add_typer(webhooks_app, name="webhooks")


def _outbox(settings: Settings) -> Any:
    from mlx_fusion.jobs import connect_store
    from mlx_fusion.services import redis_connection
    from mlx_fusion.webhooks.outbox import Outbox

    return Outbox(settings, connect_store(settings), redis_connection(settings))


@webhooks_app.command("replay")
def webhooks_replay(job_id: str) -> None:
    """Deliver a finished job's webhook again (same webhook-id, a new round of attempts)."""
    try:
        record = _outbox(Settings()).replay(job_id)
    except FusionError as e:
        _fail(e)
    typer.echo(f"replaying {job_id} to {record['webhook']['url']}")


@webhooks_app.command("failed")
def webhooks_failed(
    limit: Annotated[int, typer.Option()] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List jobs whose webhook delivery failed for good, latest first."""
    try:
        records = _outbox(Settings()).failed(limit=limit)
    except FusionError as e:
        _fail(e)
    rows = [
        {
            "id": r["id"],
            "url": r["webhook"].get("url"),
            "event": r["webhook"].get("event"),
            "attempts": len(r["webhook"].get("attempts") or []),
            "failed_at": r["webhook"].get("failed_at"),
            "error": r["webhook"].get("error"),
        }
        for r in records
    ]
    if as_json:
        _print(rows)
        return
    for row in rows:
        error = row["error"] or {}
        typer.echo(
            f"{row['id']}  {row['failed_at']}  attempts={row['attempts']}  "
            f"{error.get('code', '')}: {error.get('message', '')}  {row['url']}"
        )


@webhooks_app.command("new-secret")
def webhooks_new_secret() -> None:
    """Print a new random webhook secret (whsec_...) for FUSION_WEBHOOK_SECRETS."""
    from mlx_fusion.webhooks.signing import generate_secret

    typer.echo(generate_secret())


@app.command("config-reference")
def config_reference(
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Print (or write) the configuration reference: every FUSION_ variable, default, meaning."""
    from mlx_fusion.reference import configuration_reference

    text = configuration_reference()
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}")


@app.command("schema")
def schema_command(
    out: Annotated[Path, typer.Option(help="Folder for the JSON Schema files.")] = Path(
        "docs/schemas"
    ),
) -> None:
    """Write the JSON Schemas of the Tier-2 contract (job document, each kind's input)."""
    from mlx_fusion.reference import write_schemas

    for path in write_schemas(out):
        typer.echo(f"wrote {path}")


def main() -> None:
    """Console entry point."""
    app()
