"""Data a job carries or references: base64, ``data:`` URLs, files under the allowed input folder.

Used by kinds' ``prepare`` hooks in the worker process, so a model process only ever gets inline
bytes; nothing here follows a path or URL a job supplies beyond these rules.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from mlx_fusion.errors import InputPathNotAllowed, InputTooLarge, InvalidInput

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*);base64,")


def decode_base64(data: str, *, field: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string (padding optional); ``InvalidInput`` / ``InputTooLarge``."""
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InputTooLarge(f"more than {max_bytes} bytes", field=field)
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"not valid base64: {e}", field=field) from e
    if len(raw) > max_bytes:
        raise InputTooLarge(f"{len(raw)} bytes, the limit is {max_bytes}", field=field)
    return raw


def decode_data_url(url: str, *, field: str, max_bytes: int) -> tuple[str | None, bytes]:
    """(mime type, bytes) of a ``data:<mime>;base64,<data>`` URL."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidInput("expected a data:<type>;base64,<data> URL", field=field)
    return match.group("mime"), decode_base64(url[match.end() :], field=field, max_bytes=max_bytes)


def resolve_input_file(ref: str, input_dir: Path | None, *, field: str) -> Path:
    """The file ``ref`` names inside ``input_dir`` (relative to it, or absolute within it), after
    resolving symlinks; ``InputPathNotAllowed`` for anything else."""
    if input_dir is None:
        raise InputPathNotAllowed(
            "this worker accepts no file references (FUSION_INPUT_DIR is not set); send the data "
            "inline",
            field=field,
        )
    root = input_dir.resolve()
    candidate = Path(ref)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise InputPathNotAllowed(f"{ref!r} is outside the input folder", field=field)
    if not path.is_file():
        raise InvalidInput(f"{ref!r} is not a file in the input folder", field=field)
    return path


def read_input_file(ref: str, input_dir: Path | None, *, field: str, max_bytes: int) -> bytes:
    """The bytes of a file under the input folder, refusing files larger than ``max_bytes``."""
    path = resolve_input_file(ref, input_dir, field=field)
    size = path.stat().st_size
    if size > max_bytes:
        raise InputTooLarge(f"{ref!r} is {size} bytes, the limit is {max_bytes}", field=field)
    return path.read_bytes()
