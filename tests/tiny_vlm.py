"""A tiny random-weight vision-language model for tests: a real mlx-vlm llava directory (a
2-layer, 64-wide llama and a 2-layer, 32-wide CLIP vision tower on 32 px images, patch 8) with a
``LlavaProcessor`` (a ``CLIPImageProcessor`` plus the tiny test tokenizer with an ``<image>``
token). It tests the plumbing (loading, image decoding, prompt building, stopping), not quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tiny_models import EOS_TOKEN, SPECIAL_TOKENS, build_tiny_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _add_image_token(out_dir: Path) -> int:
    """Add ``<image>`` as a special token to ``tokenizer.json``; return its id."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    assert image_id is not None
    return int(image_id)


def build_tiny_llava(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight llava (``seed``) into ``out_dir`` (created if needed) so that
    ``mlx_vlm.load(out_dir)`` works; return ``out_dir``. Weights are float32."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import llava

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out_dir)
    image_id = _add_image_token(out_dir)
    vocab_size = image_id + 1
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["chat_template"] = LLAVA_TEMPLATE
    tok_config["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    (out_dir / "chat_template.jinja").write_text(LLAVA_TEMPLATE, encoding="utf-8")
    text_config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": 32,
    }
    config: dict[str, Any] = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": image_id,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "vocab_size": vocab_size,
        "eos_token_id": [eos_id],
    }
    mx.random.seed(seed)
    model_config = llava.ModelConfig.from_dict(config)
    model_config.text_config = llava.TextConfig.from_dict(text_config)
    model_config.vision_config = llava.VisionConfig.from_dict(vision_config)
    model = llava.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": True,
            "size": {"shortest_edge": IMAGE_SIZE},
            "do_center_crop": True,
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
            "resample": 3,
        },
    )
    _write_json(
        out_dir / "processor_config.json",
        {
            "processor_class": "LlavaProcessor",
            "patch_size": PATCH_SIZE,
            "vision_feature_select_strategy": "default",
            "image_token": IMAGE_TOKEN,
            "num_additional_image_tokens": 1,
        },
    )
    return out_dir
