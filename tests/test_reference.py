"""The configuration reference and the contract's JSON Schemas are generated from the code; the
committed copies must be what the commands write now (regenerate with
``mlx-fusion config-reference --out docs/configuration.md`` and ``mlx-fusion schema``)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO
from typer.testing import CliRunner

from mlx_fusion.cli import app
from mlx_fusion.config import Settings
from mlx_fusion.reference import configuration_reference, contract_schemas, schema_text

DOCS = REPO / "docs"


def test_committed_configuration_reference_is_current() -> None:
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == configuration_reference(), (
        "docs/configuration.md is stale: run "
        "mlx-fusion config-reference --out docs/configuration.md"
    )


def test_configuration_reference_names_every_setting_with_a_meaning() -> None:
    text = configuration_reference()
    for name, field in Settings.model_fields.items():
        assert f"`FUSION_{name.upper()}`" in text
        assert field.description, f"{name} has no description"


def test_committed_schemas_are_current() -> None:
    committed = {p.name: p.read_text(encoding="utf-8") for p in (DOCS / "schemas").glob("*.json")}
    generated = {name: schema_text(schema) for name, schema in contract_schemas().items()}
    assert committed == generated, "docs/schemas is stale: run mlx-fusion schema"


def test_job_schema_describes_the_contract() -> None:
    job = contract_schemas()["job.v1.json"]
    assert set(job["required"]) == {"kind", "model", "input"}
    assert job["additionalProperties"] is False
    assert {"webhook", "idempotency_key", "timeout_s", "priority"} <= set(job["properties"])
    assert "input.chat.completion.v1.json" in contract_schemas()


def test_commands_write_what_is_committed(tmp_path: Path) -> None:
    runner = CliRunner()
    printed = runner.invoke(app, ["config-reference"])
    assert printed.exit_code == 0 and printed.output == configuration_reference()
    written = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert written.exit_code == 0, written.output
    for path in tmp_path.glob("*.json"):
        assert json.loads(path.read_text()) == json.loads(
            (DOCS / "schemas" / path.name).read_text()
        )
    assert len(list(tmp_path.glob("*.json"))) == len(contract_schemas())
