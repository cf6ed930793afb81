"""Tiny random-weight models for tests: real mlx-lm directories that load and generate in
well under a second on the CPU. They test plumbing (loading, chat templates, streaming,
stopping), not quality: the text they produce is noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "What is the capital of France? Answer in one sentence.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, and a list: apples, pears, plums.",
    "user assistant system You are a helpful assistant.",
)


_NOT_MODEL_ARGS = ("architectures", "eos_token_id")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_tiny_tokenizer(out_dir: Path, *, vocab_size: int = 320) -> int:
    """Train a byte-level BPE tokenizer (GPT-2 style, with chatml special tokens) on a few
    sentences and write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``.
    Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOS_TOKEN,
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 512,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    return int(tokenizer.get_vocab_size())


def build_tiny_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a 2-layer, 64-wide Llama with random weights (``seed``) and a real tokenizer into
    ``out_dir`` (created if needed) so that ``mlx_lm.load(out_dir)`` works; return ``out_dir``.

    The weights are float32 (MLX's CPU backend is far slower in float16).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tiny_tokenizer(out_dir)
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "eos_token_id": eos_id,
    }
    mx.random.seed(seed)
    args = llama.ModelArgs(**{k: v for k, v in config.items() if k not in _NOT_MODEL_ARGS})
    model = llama.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(out_dir / "config.json", config)
    return out_dir
