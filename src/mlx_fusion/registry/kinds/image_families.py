"""Which mflux model family a model directory holds, and what each family needs.

``FAMILIES`` lists the families this version runs (mflux class, ``ModelConfig`` method, how an
edit takes its input image, default steps and guidance); ``detect_family`` reads a model
directory (``model_index.json``, ``transformer/config.json``, the name) without importing mflux or
MLX, so the worker process may call it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_fusion.errors import ModelLoadError

EditMode = Literal["img2img", "reference", "inpaint", "references"]
"""How a family takes an edit's input image: ``img2img`` (a generation model starting from the
image, ``image_strength``), ``reference`` (Kontext: one conditioning image), ``inpaint`` (Fill:
image and mask), ``references`` (Qwen-Image-Edit: a list of images)."""


@dataclass(frozen=True)
class Family:
    """An mflux model family: how to load it and how to call it."""

    id: str
    title: str
    module: str
    cls: str
    config: str
    """The ``ModelConfig`` static method that describes it."""
    edit: EditMode
    generates: bool
    """Makes images from text alone (else it only edits)."""
    steps: int
    guidance: float | None
    """Default guidance; None leaves mflux's own (guidance-distilled families ignore it)."""


_FLUX = "mflux.models.flux.variants"
_QWEN = "mflux.models.qwen.variants"
_ZIMAGE = "mflux.models.z_image.variants.z_image"

FAMILIES: dict[str, Family] = {
    f.id: f
    for f in (
        Family("flux1-schnell", "FLUX.1 schnell", f"{_FLUX}.txt2img.flux", "Flux1", "schnell",
               "img2img", True, 4, None),
        Family("flux1-dev", "FLUX.1 dev", f"{_FLUX}.txt2img.flux", "Flux1", "dev",
               "img2img", True, 25, 3.5),
        Family("flux1-kontext", "FLUX.1 Kontext", f"{_FLUX}.kontext.flux_kontext", "Flux1Kontext",
               "dev_kontext", "reference", False, 25, 2.5),
        Family("flux1-fill", "FLUX.1 Fill", f"{_FLUX}.fill.flux_fill", "Flux1Fill", "dev_fill",
               "inpaint", False, 25, 30.0),
        Family("qwen-image", "Qwen-Image", f"{_QWEN}.txt2img.qwen_image", "QwenImage",
               "qwen_image", "img2img", True, 20, 3.5),
        Family("qwen-image-edit", "Qwen-Image-Edit", f"{_QWEN}.edit.qwen_image_edit",
               "QwenImageEdit", "qwen_image_edit", "references", False, 20, 2.5),
        Family("qwen-image-edit-2511", "Qwen-Image-Edit-2511", f"{_QWEN}.edit.qwen_image_edit",
               "QwenImageEdit", "qwen_image_edit_2511", "references", False, 20, 2.5),
        Family("z-image-turbo", "Z-Image Turbo", _ZIMAGE, "ZImage", "z_image_turbo",
               "img2img", True, 9, None),
        Family("z-image", "Z-Image", _ZIMAGE, "ZImage", "z_image", "img2img", True, 50, None),
    )
}  # fmt: skip
"""The families this version runs, by id (defaults: mflux's own command-line defaults)."""


PIPELINE_CLASSES = {
    "FluxPipeline": "flux1",
    "FluxImg2ImgPipeline": "flux1",
    "FluxKontextPipeline": "flux1-kontext",
    "FluxFillPipeline": "flux1-fill",
    "QwenImagePipeline": "qwen-image",
    "QwenImageImg2ImgPipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image-edit",
    "QwenImageEditPlusPipeline": "qwen-image-edit",
    "ZImagePipeline": "z-image",
}
"""``_class_name`` of a diffusers ``model_index.json`` -> architecture."""
TRANSFORMER_CLASSES = {
    "FluxTransformer2DModel": "flux1",
    "QwenImageTransformer2DModel": "qwen-image",
    "ZImageTransformer2DModel": "z-image",
}
"""``_class_name`` of ``transformer/config.json`` (snapshots mflux downloaded have no
``model_index.json``) -> architecture."""
FILL_IN_CHANNELS = 384
"""``in_channels`` of FLUX.1 Fill's transformer (64 for the other FLUX.1 models)."""
_HF_CACHE_DIR = re.compile(r"^models--[^-].*?--(?P<name>.+)$")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_name(model_dir: Path) -> str:
    """The name that describes a model directory, lower-case: its own name, or for a Hugging Face
    cache snapshot (``models--ORG--NAME/snapshots/REV``) the repository's NAME."""
    if model_dir.parent.name == "snapshots":
        match = _HF_CACHE_DIR.match(model_dir.parent.parent.name)
        if match:
            return match.group("name").lower()
    return model_dir.name.lower()


def _architecture(pipeline: Any, transformer: Any, name: str) -> str | None:
    if isinstance(pipeline, str) and pipeline in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[pipeline]
    if isinstance(transformer, str) and transformer in TRANSFORMER_CLASSES:
        return TRANSFORMER_CLASSES[transformer]
    if "qwen" in name:
        return "qwen-image"
    if re.search(r"z[-_]?image", name):
        return "z-image"
    if "flux" in name or "schnell" in name or "kontext" in name:
        return "flux1"
    return None


def detect_family(model_dir: Path) -> Family:
    """The family of a model directory (the rule is in docs/kinds/images.md):

    1. the architecture: ``model_index.json``'s pipeline class, else ``transformer/config.json``'s
       class, else the name (``qwen``, ``z-image``, ``flux``/``schnell``/``kontext``);
    2. the variant, from the transformer config where it decides (Fill's 384 input channels;
       schnell has no guidance embedding) and from the name (``kontext``, ``fill``, ``edit``,
       ``2511``, ``turbo``, ``schnell``, ``dev``).

    ``ModelLoadError`` when the directory does not say enough.
    """
    index = _read_json(model_dir / "model_index.json")
    transformer = _read_json(model_dir / "transformer" / "config.json")
    name = model_name(model_dir)
    pipeline = index.get("_class_name")
    arch = _architecture(pipeline, transformer.get("_class_name"), name)
    family: str | None = None
    if arch == "flux1":
        guidance_embeds = transformer.get("guidance_embeds")
        if transformer.get("in_channels") == FILL_IN_CHANNELS or "fill" in name:
            family = "flux1-fill"
        elif "kontext" in name:
            family = "flux1-kontext"
        elif guidance_embeds is False or (guidance_embeds is None and "schnell" in name):
            family = "flux1-schnell"
        elif guidance_embeds is True or "dev" in name or "krea" in name:
            family = "flux1-dev"
    elif arch in ("flux1-kontext", "flux1-fill"):
        family = arch
    elif arch in ("qwen-image", "qwen-image-edit"):
        edit = arch == "qwen-image-edit" or "edit" in name
        if edit and ("2511" in name or transformer.get("zero_cond_t") is True):
            family = "qwen-image-edit-2511"
        else:
            family = "qwen-image-edit" if edit else "qwen-image"
    elif arch == "z-image":
        family = "z-image-turbo" if "turbo" in name else "z-image"
    if family is None:
        found = f"model_index.json class {pipeline!r}" if pipeline else "no model_index.json"
        what = "FLUX.1 schnell from dev" if arch == "flux1" else "which mflux model family it is"
        raise ModelLoadError(
            f"{model_dir}: cannot tell {what} ({found}, name {name!r}); use the model's "
            "Hugging Face directory, or name the directory after the model (e.g. "
            "'FLUX.1-schnell-4bit'); known families: " + ", ".join(FAMILIES)
        )
    return FAMILIES[family]
