"""The service files in deploy/ (launchd, systemd) and the Grafana dashboard: they parse, run
commands and options the CLI has, and query only metrics the workers export."""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    DASHBOARD,
    DEPLOY,
    HISTOGRAMS,
    dashboard_metric_names,
    dashboard_queries,
    parse_unit,
    unit_values,
)
from typer.testing import CliRunner

from mlx_fusion import defaults
from mlx_fusion.cli import app
from mlx_fusion.config import Settings

PLISTS = sorted((DEPLOY / "launchd").glob("*.plist"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
ENV_EXAMPLE = DEPLOY / "systemd" / "mlx-fusion.env.example"
GPU_WORKER_PLIST = DEPLOY / "launchd" / "com.mlx-fusion.worker.plist"
GPU_WORKER_UNIT = DEPLOY / "systemd" / "mlx-fusion-worker@.service"

EXPORTED_METRICS = frozenset(
    {
        # GPU worker
        "fusion_jobs_total",
        "fusion_job_queue_wait_seconds",
        "fusion_job_inference_seconds",
        "fusion_model_load_seconds",
        "fusion_tokens_generated_total",
        "fusion_prompt_tokens_total",
        "fusion_models_loaded",
        "fusion_model_bytes",
        "fusion_memory_budget_bytes",
        "fusion_model_loads_total",
        "fusion_model_evictions_total",
        "fusion_model_load_failures_total",
        "fusion_device_memory_active_bytes",
        "fusion_device_memory_peak_bytes",
        "fusion_device_memory_cache_bytes",
        "fusion_queue_depth",
        "fusion_queue_oldest_age_seconds",
        "fusion_worker_busy",
        "fusion_worker_info",
        "fusion_worker_last_heartbeat_timestamp_seconds",
        # webhook worker
        "fusion_webhook_attempts_total",
        "fusion_webhook_deliveries_total",
        "fusion_webhook_attempt_seconds",
    }
)
"""Every metric a worker exports (histograms by their base name)."""


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def cli_help(args: list[str]) -> Any:
    """Run ``mlx-fusion ARGS --help`` in process: exit code 0 proves the command and every
    option exist, without running the command."""
    return CliRunner().invoke(app, [*args, "--help"])


def load_plist(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        data: dict[str, Any] = plistlib.load(f)
    return data


def exec_start(path: Path) -> list[str]:
    (value,) = unit_values(parse_unit(path), "Service", "ExecStart")
    return shlex.split(value.lstrip("-@:+!"))


def env_file_settings(path: Path) -> dict[str, str]:
    pairs = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def test_deploy_files_exist() -> None:
    assert _ids(PLISTS) == [
        "com.mlx-fusion.scheduler.plist",
        "com.mlx-fusion.webhook-worker.plist",
        "com.mlx-fusion.worker.plist",
    ]
    assert _ids(UNITS) == [
        "mlx-fusion-scheduler.service",
        "mlx-fusion-webhook-worker.service",
        "mlx-fusion-worker@.service",
    ]


def test_cli_check_rejects_an_unknown_option() -> None:
    assert cli_help(["worker", "--json-logs"]).exit_code == 0
    assert cli_help(["worker", "--no-such-option"]).exit_code != 0
    assert cli_help(["no-such-command"]).exit_code != 0


# ---- launchd


@pytest.mark.parametrize("path", PLISTS, ids=_ids(PLISTS))
def test_plist_is_labelled_by_its_file_name(path: Path) -> None:
    assert load_plist(path)["Label"] == path.stem


@pytest.mark.parametrize("path", PLISTS, ids=_ids(PLISTS))
def test_plist_runs_a_cli_command_that_exists(path: Path) -> None:
    argv = load_plist(path)["ProgramArguments"]
    assert Path(argv[0]).name == "mlx-fusion"
    result = cli_help(argv[1:])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", PLISTS, ids=_ids(PLISTS))
def test_plist_keeps_the_service_running(path: Path) -> None:
    plist = load_plist(path)
    assert plist["RunAtLoad"] is True
    # True, not {"SuccessfulExit": False}: a worker that exits cleanly must come back too
    assert plist["KeepAlive"] is True
    assert plist["ThrottleInterval"] == 10


@pytest.mark.parametrize("path", PLISTS, ids=_ids(PLISTS))
def test_plist_logs_to_the_log_directory(path: Path) -> None:
    plist = load_plist(path)
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).parent == Path("/usr/local/var/log/mlx-fusion")
    assert Path(plist["WorkingDirectory"]).is_absolute()


@pytest.mark.parametrize("path", PLISTS, ids=_ids(PLISTS))
def test_plist_keeps_secrets_out_of_the_file(path: Path) -> None:
    assert "FUSION_WEBHOOK_SECRETS" not in load_plist(path)["EnvironmentVariables"]


def test_gpu_worker_plist_is_not_throttled_and_others_are() -> None:
    for path in PLISTS:
        expected = "Interactive" if path == GPU_WORKER_PLIST else "Background"
        assert load_plist(path)["ProcessType"] == expected, path.name


def test_plist_metrics_ports_are_distinct() -> None:
    ports = {
        path.stem: load_plist(path)["EnvironmentVariables"].get("FUSION_METRICS_PORT")
        for path in PLISTS
    }
    assert ports == {
        "com.mlx-fusion.worker": "9464",
        "com.mlx-fusion.webhook-worker": "9465",
        "com.mlx-fusion.scheduler": None,
    }


def test_gpu_worker_plist_waits_for_the_longest_job_on_stop() -> None:
    assert load_plist(GPU_WORKER_PLIST)["ExitTimeOut"] > defaults.JOB_TIMEOUT_MAX_S


# ---- systemd


@pytest.mark.parametrize("path", UNITS, ids=_ids(UNITS))
def test_unit_has_the_sections_and_restart_policy(path: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(path, encoding="utf-8")
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    unit = parse_unit(path)
    assert unit_values(unit, "Service", "Type") == ["simple"]
    assert unit_values(unit, "Service", "Restart") == ["always"]
    assert unit_values(unit, "Service", "KillSignal") == ["SIGTERM"]
    assert unit_values(unit, "Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize("path", UNITS, ids=_ids(UNITS))
def test_unit_runs_a_cli_command_that_exists(path: Path) -> None:
    argv = exec_start(path)
    assert argv[0].endswith("/mlx-fusion")
    result = cli_help(argv[1:])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", UNITS, ids=_ids(UNITS))
def test_unit_is_sandboxed_with_a_writable_state_directory(path: Path) -> None:
    unit = parse_unit(path)
    service = dict(unit["Service"])
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["StateDirectory"] == "mlx-fusion"
    assert service["ReadWritePaths"] == "/var/lib/mlx-fusion"
    assert "FUSION_DATA_DIR=/var/lib/mlx-fusion" in unit_values(unit, "Service", "Environment")


def test_gpu_worker_unit_sees_its_own_gpu() -> None:
    unit = parse_unit(GPU_WORKER_UNIT)
    assert "CUDA_VISIBLE_DEVICES=%i" in unit_values(unit, "Service", "Environment")
    assert unit_values(unit, "Service", "PrivateDevices") == []
    assert unit_values(unit, "Service", "EnvironmentFile") == [
        "/etc/mlx-fusion/worker.env",
        "-/etc/mlx-fusion/worker-%i.env",
    ]


def test_gpu_worker_unit_waits_for_the_longest_job_on_stop() -> None:
    (timeout,) = unit_values(parse_unit(GPU_WORKER_UNIT), "Service", "TimeoutStopSec")
    assert int(timeout) > defaults.JOB_TIMEOUT_MAX_S


def test_gpu_worker_unit_signals_only_the_worker_not_its_model_processes() -> None:
    # with the default KillMode=control-group, SIGTERM would kill the running job's model
    assert unit_values(parse_unit(GPU_WORKER_UNIT), "Service", "KillMode") == ["mixed"]


def _systemd_analyze_flags() -> list[str]:
    help_text = subprocess.run(
        ["systemd-analyze", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    # only errors in the unit given count towards the exit code (systemd >= 250)
    return ["--recursive-errors=no"] if "--recursive-errors" in help_text else []


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run(
        ["systemd-analyze", "verify", *_systemd_analyze_flags(), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _real_mlx_fusion() -> str:
    beside_python = shutil.which("mlx-fusion", path=str(Path(sys.executable).parent))
    return beside_python or shutil.which("mlx-fusion") or sys.executable


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def verifiable_copy(path: Path, directory: Path) -> Path:
    """The unit with a real ExecStart binary, without a User= this host lacks, and a template
    given an instance name."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ExecStart":
            argv = shlex.split(value)
            line = "ExecStart=" + shlex.join([_real_mlx_fusion(), *argv[1:]])
        elif key.strip() == "User" and not _user_exists(value.strip()):
            continue
        lines.append(line)
    copy = directory / path.name.replace("@.", "@0.")
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return copy


@pytest.fixture(scope="module")
def systemd_analyze(tmp_path_factory: pytest.TempPathFactory) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    probe = tmp_path_factory.mktemp("probe") / "mlx-fusion-probe.service"
    probe.write_text(
        f"[Service]\nType=oneshot\nExecStart={sys.executable} -V\n\n"
        "[Install]\nWantedBy=multi-user.target\n",
        encoding="utf-8",
    )
    result = _verify(probe)
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify fails on a trivial unit here: {result.stderr}")


@pytest.mark.parametrize("path", UNITS, ids=_ids(UNITS))
def test_unit_passes_systemd_analyze_verify(
    path: Path, tmp_path: Path, systemd_analyze: None
) -> None:
    copy = verifiable_copy(path, tmp_path)
    result = _verify(copy)
    output = result.stdout + result.stderr
    about_ours = [line for line in output.splitlines() if copy.name in line]
    assert about_ours == [], output
    assert result.returncode == 0, output


# ---- settings named in the files


def deploy_settings() -> list[tuple[str, dict[str, str]]]:
    found = [(ENV_EXAMPLE.name, env_file_settings(ENV_EXAMPLE))]
    for path in PLISTS:
        found.append((path.name, dict(load_plist(path)["EnvironmentVariables"])))
    return found


@pytest.mark.parametrize(
    ("name", "variables"), deploy_settings(), ids=[name for name, _ in deploy_settings()]
)
def test_deploy_file_settings_are_valid(
    name: str, variables: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fusion = {k: v for k, v in variables.items() if k.startswith("FUSION_")}
    known = {f"FUSION_{field.upper()}" for field in Settings.model_fields}
    assert set(fusion) <= known, f"{name}: unknown {set(fusion) - known}"
    for key in [k for k in os.environ if k.startswith("FUSION_")]:
        monkeypatch.delenv(key)
    for key, value in fusion.items():
        monkeypatch.setenv(key, value)
    Settings(_env_file=None)  # type: ignore[call-arg]


def test_env_example_lists_the_service_variables() -> None:
    assert {
        "FUSION_REDIS_URL",
        "FUSION_MONGO_URL",
        "FUSION_CATALOG_PATH",
        "FUSION_METRICS_PORT",
        "FUSION_WEBHOOK_SECRETS",
        "FUSION_LOG_FORMAT",
    } <= set(env_file_settings(ENV_EXAMPLE))
    assert env_file_settings(ENV_EXAMPLE)["FUSION_LOG_FORMAT"] == "json"


# ---- Grafana


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows (layout only, no queries), including those inside a row."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def test_dashboard_has_panels_on_schema_39() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39
    assert len(query_panels(dashboard)) >= 10


def test_every_dashboard_panel_has_a_datasource_and_targets() -> None:
    for panel in query_panels(load_dashboard()):
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_dashboard_has_datasource_and_worker_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    worker = variables["worker"]
    assert worker["definition"] == "label_values(fusion_worker_info, worker)"
    assert worker["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert worker["includeAll"] is True


def test_dashboard_queries_only_exported_metrics() -> None:
    assert HISTOGRAMS <= EXPORTED_METRICS
    names = dashboard_metric_names(DASHBOARD)
    assert names, "no fusion_ metric found in the dashboard"
    assert names <= EXPORTED_METRICS, names - EXPORTED_METRICS


def test_dashboard_filters_every_series_by_worker() -> None:
    panels = query_panels(load_dashboard())
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    for expr in exprs:
        for series in re.finditer(r"fusion_[a-z_]+(\{[^}]*\})?", expr):
            assert (series.group(1) or "").startswith('{worker=~"$worker"'), expr


def test_dashboard_metric_names_strips_suffixes_of_histograms_only(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    expr = (
        "rate(fusion_a_seconds_bucket[5m]) / rate(fusion_a_seconds_count[5m]) "
        "+ fusion_things_count + fusion_jobs_total"
    )
    path.write_text(json.dumps({"panels": [{"targets": [{"expr": expr}]}]}), encoding="utf-8")
    assert dashboard_metric_names(path, histograms={"fusion_a_seconds"}) == {
        "fusion_a_seconds",
        "fusion_things_count",
        "fusion_jobs_total",
    }


def test_dashboard_queries_include_variable_queries() -> None:
    assert "label_values(fusion_worker_info, worker)" in list(dashboard_queries(load_dashboard()))
