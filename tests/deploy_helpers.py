"""Readers for the files in deploy/: the metric names a Grafana dashboard queries, and systemd
unit files (which may repeat a key, such as EnvironmentFile=)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "mlx-fusion.json"

HISTOGRAMS = frozenset(
    {
        "fusion_job_queue_wait_seconds",
        "fusion_job_inference_seconds",
        "fusion_model_load_seconds",
        "fusion_webhook_attempt_seconds",
    }
)
"""The exported histograms: a query names them with a _bucket, _sum or _count suffix."""

_METRIC = re.compile(r"fusion_[a-z_]+")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def dashboard_queries(dashboard: Any) -> Iterator[str]:
    """Every PromQL text in a dashboard: each ``expr`` (in panels, rows and anything nested) and
    each query of a templating variable."""
    if isinstance(dashboard, dict):
        for key, value in dashboard.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "templating":
                for variable in value.get("list", []):
                    query = variable.get("query")
                    if isinstance(query, dict):
                        query = query.get("query")
                    if variable.get("type") == "query" and isinstance(query, str):
                        yield query
            else:
                yield from dashboard_queries(value)
    elif isinstance(dashboard, list):
        for item in dashboard:
            yield from dashboard_queries(item)


def metric_names(query: str, histograms: Collection[str] = HISTOGRAMS) -> set[str]:
    """The ``fusion_`` metric names in one PromQL text, a histogram's series suffix removed."""
    names = set()
    for name in _METRIC.findall(query):
        base = _HISTOGRAM_SUFFIX.sub("", name)
        names.add(base if base in histograms else name)
    return names


def dashboard_metric_names(
    path: Path = DASHBOARD, histograms: Collection[str] = HISTOGRAMS
) -> set[str]:
    """The metric names a Grafana dashboard JSON file queries (see ``metric_names``)."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    names: set[str] = set()
    for query in dashboard_queries(dashboard):
        names |= metric_names(query, histograms)
    return names


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}, repeated keys kept in order;
    ``ValueError`` on a line that is neither a section, a setting nor a comment."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.append((key.strip(), value.strip()))
        else:
            raise ValueError(f"{path}:{number}: not a unit file line: {raw!r}")
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value of ``key`` in ``section``, in file order."""
    return [value for k, value in unit.get(section, []) if k == key]
