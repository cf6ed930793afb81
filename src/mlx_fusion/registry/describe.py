"""What a catalog model is, read from its folder without loading it: family, context length,
quantization, dtype and size on disk, as a JSON-able dict (``describe_model``).

Only small config files are read (``config.json``; for image models ``model_index.json``,
``transformer/config.json`` and mflux's ``model.safetensors.index.json``), each at most
``MAX_CONFIG_BYTES``; nothing imports MLX. A missing folder or a broken config never raises: the
dict holds what could be read and says what could not in ``error``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mlx_fusion.errors import ModelLoadError
from mlx_fusion.registry.catalog import Catalog, ModelKind, ModelSpec
from mlx_fusion.registry.kinds.image_families import detect_family

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file parsed; a larger one is reported in ``error`` and not read."""

LM_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length")
"""Config keys that give a language model's context length, the first present winning."""

WHISPER_CONTEXT_KEYS = ("n_text_ctx", "max_target_positions")
"""Config keys of a whisper model's text context (mlx-whisper's, then transformers')."""

_IMAGE_KINDS = (ModelKind.IMAGE_GENERATION, ModelKind.IMAGE_EDIT)
_MAX_ERROR_CHARS = 200


class _ConfigError(Exception):
    """A config file that could not be read or parsed; the message is the short reason."""


def describe_model(spec: ModelSpec) -> dict[str, Any]:
    """Describe one catalog entry from its folder, without loading it.

    Keys: ``id``, ``kind``, ``aliases``, ``path``, ``hub``, ``pinned``, ``keep_alive_s``,
    ``max_concurrent_jobs`` (from the catalog); ``family``, ``context_length``, ``quantization``
    (``{"bits", "group_size"}`` as stored, ``{"bits", "group_size": None, "on_load": True}`` from
    ``quantize_bits``, else None), ``dtype``, ``size_on_disk_bytes`` (from the folder; None where
    unknown) and ``error`` (None, or a short reason why something could not be read). Never
    raises for a missing or broken folder.
    """
    info: dict[str, Any] = {
        "id": spec.id,
        "kind": spec.kind.value,
        "aliases": list(spec.aliases),
        "path": str(spec.path) if spec.path is not None else None,
        "hub": spec.hub,
        "pinned": spec.pinned,
        "keep_alive_s": spec.keep_alive_s,
        "max_concurrent_jobs": spec.max_concurrent_jobs,
        "family": None,
        "context_length": None,
        "quantization": None,
        "dtype": None,
        "size_on_disk_bytes": None,
        "error": None,
    }
    errors: list[str] = []
    model_dir = spec.path
    if model_dir is None:
        errors.append("hub model not resolved to a local folder")
    elif not model_dir.is_dir():
        what = "is not a directory" if model_dir.exists() else "does not exist"
        errors.append(f"model folder {model_dir} {what}")
    else:
        info["size_on_disk_bytes"] = size_on_disk(model_dir)
        if spec.kind in _IMAGE_KINDS:
            _describe_image(model_dir, info, errors)
        else:
            _describe_config(spec.kind, model_dir, info, errors)
    if info["quantization"] is None and spec.quantize_bits is not None:
        info["quantization"] = {"bits": spec.quantize_bits, "group_size": None, "on_load": True}
    if errors:
        info["error"] = "; ".join(errors)[:_MAX_ERROR_CHARS]
    return info


def describe_catalog(catalog: Catalog) -> list[dict[str, Any]]:
    """``describe_model`` of every catalog entry, sorted by id."""
    return [describe_model(spec) for spec in sorted(catalog, key=lambda s: s.id)]


def size_on_disk(root: Path) -> int:
    """Bytes of the regular files under ``root``, each file counted once (hard links and
    several links to one file). Symbolic links are followed only to files inside ``root`` (for a
    Hugging Face cache snapshot, inside its ``models--ORG--NAME`` folder, where the blobs are);
    linked directories are not entered. Unreadable entries are skipped."""
    real_root = os.path.realpath(root)
    boundary = _link_boundary(Path(real_root))
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [real_root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    target = Path(os.path.realpath(entry.path))
                    if not target.is_relative_to(boundary):
                        continue
                    st = target.stat()
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and key not in seen:
                seen.add(key)
                total += st.st_size
    return total


def _link_boundary(real_root: Path) -> Path:
    """Where links under ``real_root`` may point: the repository folder of a cache snapshot."""
    repo = real_root.parent.parent
    if real_root.parent.name == "snapshots" and repo.name.startswith("models--"):
        return repo
    return real_root


def _read_config(model_dir: Path, name: str) -> dict[str, Any]:
    """The JSON object in ``model_dir / name``, read only if it is a regular file of at most
    ``MAX_CONFIG_BYTES``; ``FileNotFoundError`` when absent, ``_ConfigError`` otherwise."""
    try:
        fd = os.open(model_dir / name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _ConfigError(f"{name} cannot be opened: {e.strerror or type(e).__name__}") from e
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _ConfigError(f"{name} is not a regular file")
            if st.st_size > MAX_CONFIG_BYTES:
                raise _ConfigError(f"{name} is over 1 MiB ({st.st_size} bytes); not parsed")
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise _ConfigError(f"{name} cannot be read: {e.strerror or type(e).__name__}") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise _ConfigError(f"{name} is over 1 MiB; not parsed")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:
        reason = str(e) if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise _ConfigError(f"{name} is not valid JSON: {reason}") from e
    if not isinstance(parsed, dict):
        raise _ConfigError(f"{name} does not hold a JSON object")
    return parsed


def _describe_config(
    kind: ModelKind, model_dir: Path, info: dict[str, Any], errors: list[str]
) -> None:
    """Family, context length, stored quantization and dtype from ``config.json``."""
    try:
        config = _read_config(model_dir, "config.json")
    except FileNotFoundError:
        errors.append("config.json not found")
        return
    except _ConfigError as e:
        errors.append(str(e))
        return
    text = config.get("text_config")
    text_config: dict[str, Any] = text if isinstance(text, dict) else {}
    family = _str(config.get("model_type"))
    if kind == ModelKind.WHISPER:
        info["family"] = family or "whisper"
        info["context_length"] = _first_int((config,), WHISPER_CONTEXT_KEYS)
    elif kind == ModelKind.VLM:
        info["family"] = family
        info["context_length"] = _first_int((text_config, config), LM_CONTEXT_KEYS)
    elif kind == ModelKind.EMBEDDINGS:
        info["family"] = family
        info["context_length"] = _first_int((config,), ("max_position_embeddings",))
    else:
        info["family"] = family
        info["context_length"] = _first_int((config, text_config), LM_CONTEXT_KEYS)
    info["quantization"] = _stored_quantization(config)
    dtypes = (_str(c.get(k)) for c in (config, text_config) for k in ("torch_dtype", "dtype"))
    info["dtype"] = next((d for d in dtypes if d is not None), None)


def _describe_image(model_dir: Path, info: dict[str, Any], errors: list[str]) -> None:
    """The mflux family ``kinds.image`` would load, and the bit width of an mflux-saved model."""
    for name in ("model_index.json", "transformer/config.json"):
        try:
            _read_config(model_dir, name)
        except FileNotFoundError:
            pass
        except _ConfigError as e:
            errors.append(str(e))
            return
    try:
        info["family"] = detect_family(model_dir).id
    except ModelLoadError:
        errors.append("cannot tell the mflux model family from the folder")
    indexes = [
        *model_dir.glob("model.safetensors.index.json"),
        *model_dir.glob("*/model.safetensors.index.json"),
    ]
    for index in sorted(indexes):
        try:
            metadata = _read_config(model_dir, str(index.relative_to(model_dir))).get("metadata")
        except (FileNotFoundError, _ConfigError):
            continue
        level = metadata.get("quantization_level") if isinstance(metadata, dict) else None
        if isinstance(level, str) and level.isdigit():
            info["quantization"] = {"bits": int(level), "group_size": None}
            return


def _stored_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """``{"bits", "group_size"}`` of ``quantization`` (mlx) or ``quantization_config`` (HF)."""
    for key in ("quantization", "quantization_config"):
        section = config.get(key)
        if isinstance(section, dict):
            bits = _int(section.get("bits"))
            if bits is not None:
                return {"bits": bits, "group_size": _int(section.get("group_size"))}
    return None


def _first_int(configs: tuple[dict[str, Any], ...], keys: tuple[str, ...]) -> int | None:
    """The first int among ``keys`` of the first config that has one."""
    values = (_int(config.get(key)) for config in configs for key in keys)
    return next((n for n in values if n is not None), None)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
