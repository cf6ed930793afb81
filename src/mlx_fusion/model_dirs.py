"""Writing converted model directories so a crash never leaves one that looks complete.

A conversion builds into a temp directory beside its target and renames it into place; a
completion marker written last says it finished. Used by the GGUF and CTranslate2 importers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STALE_AFTER_S = 600
"""Leftovers of a killed conversion (one takes seconds) older than this are removed."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """A temp directory beside ``out_dir`` to write into; on success it replaces ``out_dir``
    (any old one is renamed aside first), on failure it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model cache is an ordinary directory
        yield tmp
        old: Path | None = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_leftovers(out_dir: Path) -> None:
    """Delete the temp directories a killed conversion into ``out_dir`` left beside it."""
    if not out_dir.parent.is_dir():
        return
    now = time.time()
    for kind in ("tmp", "old"):
        for path in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            with contextlib.suppress(OSError):
                if path.is_dir() and now - path.stat().st_mtime > STALE_AFTER_S:
                    shutil.rmtree(path, ignore_errors=True)
