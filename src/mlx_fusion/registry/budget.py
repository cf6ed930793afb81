"""How much memory a model needs and how much the worker may use: pure functions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf", ".bin", ".pt", ".pth")
DEVICE_MEMORY_KEYS = ("max_recommended_working_set_size", "memory_size", "total_memory")


def estimate_bytes(model_dir: Path) -> int:
    """The bytes of the weight files under ``model_dir`` (what loading will need at least)."""
    if model_dir.is_file():
        return model_dir.stat().st_size
    total = 0
    for path in model_dir.rglob("*"):
        if path.suffix in WEIGHT_SUFFIXES and path.is_file():
            total += path.stat().st_size
    return total


def system_memory_bytes() -> int:
    """Physical memory of this host."""
    import psutil

    return int(psutil.virtual_memory().total)


def device_memory_bytes(device_info: Mapping[str, Any]) -> int | None:
    """The device's recommended working set from ``mx.device_info()``, when it reports one."""
    for key in DEVICE_MEMORY_KEYS:
        value = device_info.get(key)
        if isinstance(value, int | float) and value > 0:
            return int(value)
    return None


def budget_bytes(
    configured_bytes: int | None, fraction: float, device_info: Mapping[str, Any] | None
) -> int:
    """The memory budget: the configured bytes, else ``fraction`` of the device's working set
    (of system memory on a device that reports none, like MLX's CPU backend)."""
    if configured_bytes is not None:
        return configured_bytes
    device = device_memory_bytes(device_info or {})
    return int(fraction * (device if device is not None else system_memory_bytes()))
