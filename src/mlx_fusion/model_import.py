"""``mlx-fusion models import``: turn model files of other runtimes into MLX model directories.

- a llama-family **GGUF** file (llama.cpp, Ollama; Q4_0 / Q4_1 / Q8_0 kept as MLX quantized
  tensors) becomes an mlx-lm directory with its tokenizer and chat template (``gguf``);
- a **CTranslate2 whisper** directory (the faster-whisper format) becomes an mlx-whisper
  directory (``ct2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mlx_fusion.errors import ModelImportError
from mlx_fusion.progress import Reporter

Format = Literal["gguf", "ct2-whisper"]
GGUF_MAGIC = b"GGUF"


def detect_format(source: Path) -> Format:
    """Which importer ``source`` needs; ``ModelImportError`` when it is neither."""
    if source.is_file():
        with source.open("rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise ModelImportError(f"{source}: not a GGUF file (no GGUF magic bytes)")
    if source.is_dir():
        if (source / "model.bin").is_file() and (source / "config.json").is_file():
            return "ct2-whisper"
        raise ModelImportError(
            f"{source}: not a CTranslate2 model directory (needs model.bin and config.json)"
        )
    raise ModelImportError(f"{source}: no such file or directory")


def import_model(
    source: Path, out_dir: Path, *, progress: Reporter | None = None
) -> tuple[Format, Path]:
    """Import ``source`` into ``out_dir`` (written atomically); returns (format, out_dir).
    ``progress`` hears each step and the count of tensors converted."""
    fmt = detect_format(source)
    try:
        if fmt == "gguf":
            from mlx_fusion.gguf import convert_gguf

            return fmt, convert_gguf(source, out_dir, progress=progress)
        from mlx_fusion.ct2 import convert_ct2_whisper

        return fmt, convert_ct2_whisper(source, out_dir, progress=progress)
    except ModelImportError:
        raise
    except Exception as e:
        raise ModelImportError(f"{source}: cannot import as {fmt}: {type(e).__name__}: {e}") from e
