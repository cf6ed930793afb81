"""Steered tiny models: real mlx-lm directories whose greedy output is a fixed script.

A steered model has one layer whose attention and MLP outputs are zeroed, so the hidden state at
each position is the current token's embedding; embeddings are one-hot, and ``lm_head`` is a
successor table: the top next token is a function of the current token alone. After the chat
prompt (always ending with the same token) the model replays its script, one token per piece
(each piece is an added token of the tokenizer), then ends with the end-of-sequence token.
An ``alternative`` gives a piece a clear second choice, which shows when a constraint masks the
first. The tokenizer knows thinking markers (``<think>``) and a JSON tool-call format
(``<tool_call>{...}</tool_call>``, which mlx-lm's ``json_tools`` parser reads), and its chat
template renders tools, tool calls and tool results.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from tiny_models import EOS_TOKEN, SPECIAL_TOKENS, build_tiny_tokenizer

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
START = "<start>"
"""Names the prompt's last token in a script's alternatives."""

STEERED_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\nYou may call these tools:\\n' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{%- endfor %}"
    '{{ \'Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n\' }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    '{{ \'<tool_call>{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{ tool_call.arguments | tojson }}{{ '}</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SCORE_NEXT = 1.0
_SCORE_ALTERNATIVE = 0.5
_SCORE_NOISE = 0.05


def build_steered_tokenizer(
    out_dir: Path, pieces: Iterable[str], template: str = STEERED_TEMPLATE
) -> Path:
    """The tiny BPE tokenizer plus the markers and ``pieces`` as added tokens, with ``template``
    as its chat template (default: the tool-aware one); written into ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out_dir)
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    added = dict.fromkeys([THINK_START, THINK_END, TOOL_START, TOOL_END, *pieces])
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in added])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def build_steered_llama(
    out_dir: Path,
    tokenizer_dir: Path,
    script: list[str],
    alternatives: Mapping[str, str] | None = None,
    branches: Iterable[list[str]] = (),
) -> Path:
    """Write a model that answers any chat prompt with ``script`` (pieces of the tokenizer in
    ``tokenizer_dir``) then end-of-sequence. ``alternatives`` maps a piece (or ``START``) to the
    piece that comes second after it; each of ``branches`` is a chain of pieces (then
    end-of-sequence) the model follows once it is at the chain's first piece."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from transformers import PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"))
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer.chat_template = tokenizer_config["chat_template"]

    def token_id(piece: str) -> int:
        ids = tokenizer.encode(piece, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{piece!r} is not one token of this tokenizer: {ids}")
        return int(ids[0])

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    start = int(prompt[-1])
    eos = SPECIAL_TOKENS.index(EOS_TOKEN)
    vocab = len(tokenizer)
    hidden = -(-vocab // 16) * 16
    rng = np.random.default_rng(0)
    head = rng.uniform(0.0, _SCORE_NOISE, size=(vocab, hidden)).astype(np.float32)
    head[eos, :vocab] = _SCORE_NEXT  # every token without a successor ends the answer
    for chain in (
        [start, *map(token_id, script), eos],
        *([*map(token_id, b), eos] for b in branches),
    ):
        for current, following in pairwise(chain):
            head[eos, current] = 0.0
            head[following, current] = _SCORE_NEXT
    for piece, second in (alternatives or {}).items():
        current = start if piece == START else token_id(piece)
        head[token_id(second), current] = _SCORE_ALTERNATIVE

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }
    model = llama.Model(
        llama.ModelArgs(**{k: v for k, v in config.items() if k != "architectures"})
    )
    weights = dict(tree_flatten(model.parameters()))
    weights["model.embed_tokens.weight"] = mx.array(np.eye(vocab, hidden, dtype=np.float32))
    weights["model.layers.0.self_attn.o_proj.weight"] = mx.zeros_like(
        weights["model.layers.0.self_attn.o_proj.weight"]
    )
    weights["model.layers.0.mlp.down_proj.weight"] = mx.zeros_like(
        weights["model.layers.0.mlp.down_proj.weight"]
    )
    weights["model.norm.weight"] = mx.ones((hidden,))
    weights["lm_head.weight"] = mx.array(head)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    config["eos_token_id"] = eos
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir
