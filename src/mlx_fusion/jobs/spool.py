"""Final job writes the job store refused (MongoDB unreachable when a job finished), kept on
local disk until the store takes them.

A finished job's result must not be lost because the store was down at that moment. The worker
writes the store call it could not make (``complete``, ``fail`` or ``cancel`` with its arguments)
to ``<data_dir>/spool/<job id>.json`` (atomically: a temporary file, then a rename) and replays it
later; every final write is guarded on the job's status, so a replay that comes late or twice
changes nothing. A spooled write survives a worker restart on the same data dir.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPERATIONS = frozenset({"complete", "fail", "cancel"})
"""The job-store methods a spool entry may name."""

_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,240}$")  # RQ job ids; short enough for a file name


def _encode(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _decode(obj: dict[str, Any]) -> Any:
    if set(obj) == {"$datetime"}:
        return dt.datetime.fromisoformat(obj["$datetime"])
    return obj


@dataclass(frozen=True)
class Entry:
    """One spooled store call: ``store.<op>(job_id, **kwargs)``."""

    job_id: str
    op: str
    kwargs: dict[str, Any]
    path: Path


class Spool:
    """Store calls waiting for the store, one file per job."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, job_id: str, op: str, **kwargs: Any) -> Path:
        """Keep ``store.<op>(job_id, **kwargs)`` for later (``ValueError`` for a bad entry)."""
        if op not in OPERATIONS or not _SAFE.match(job_id):
            raise ValueError(f"cannot spool {op!r} for job {job_id!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{job_id}.json"
        tmp = path.with_suffix(".tmp")
        data = {"job_id": job_id, "op": op, "kwargs": kwargs}
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, default=_encode)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return path

    def entries(self) -> Iterator[Entry]:
        """The waiting calls, oldest first; unreadable files are skipped (and left in place)."""
        if not self.directory.is_dir():
            return
        paths = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for path in paths:
            try:
                data = json.loads(path.read_text(encoding="utf-8"), object_hook=_decode)
                entry = Entry(str(data["job_id"]), str(data["op"]), dict(data["kwargs"]), path)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if entry.op in OPERATIONS:
                yield entry
