"""Inputs of ``image.generation`` and ``image.edit`` jobs: the OpenAI ``/v1/images/generations``
and ``/v1/images/edits`` bodies, as JSON.

An edit's picture comes inline as ``image`` (base64, or a ``data:image/...;base64,`` URL) or by
reference as ``image_path``, relative to the worker's input folder (``FUSION_INPUT_DIR``); exactly
one of the two. ``mask`` / ``mask_path`` likewise, at most one. The worker turns paths into inline
data before the model process sees the job. Unknown fields are refused; ``model``, ``user``,
``quality``, ``style`` and ``response_format`` are accepted and change nothing (images always go
to the blob store: see docs/kinds/images.md).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from mlx_fusion.jobs.inputs import inline_or_path

MAX_PROMPT_CHARS = 4000
"""Longest prompt (the text encoders keep fewer tokens: 256 for schnell's T5, 512 for dev's)."""
MAX_IMAGES = 4
"""Most images one job makes (``n``)."""
MIN_SIDE = 256
"""Smallest width or height of a generated image, in pixels."""
MAX_SIDE = 2048
"""Largest width or height of a generated image, in pixels."""
SIDE_STEP = 16
"""Widths and heights are multiples of this (the latent patch size)."""
DEFAULT_SIZE = (1024, 1024)
"""Size of a generated image when the job names none (an edit keeps its input's size)."""
MAX_STEPS = 100
"""Most denoising steps a job may ask for."""
MAX_GUIDANCE = 50.0
"""Largest guidance scale (FLUX.1 Fill's own default is 30)."""
MAX_SEED = 2**32 - 1
"""Seeds are 0..2**32-1; image ``i`` of a job uses ``(seed + i) mod 2**32``."""

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str) -> tuple[int, int]:
    """``(width, height)`` of a ``"WIDTHxHEIGHT"`` string; ``ValueError`` (with the rule broken)
    unless both are multiples of 16 within 256..2048."""
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(f"{size!r} is not WIDTHxHEIGHT (e.g. '1024x768') or 'auto'")
    width, height = int(match.group(1)), int(match.group(2))
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"{name} {side} is outside {MIN_SIDE}..{MAX_SIDE}")
        if side % SIDE_STEP:
            raise ValueError(f"{name} {side} is not a multiple of {SIDE_STEP}")
    return width, height


def fit_size(width: int, height: int) -> tuple[int, int]:
    """The allowed size closest to ``width`` x ``height`` at the same aspect ratio: scaled into
    256..2048 (extreme ratios are clamped), each side rounded down to a multiple of 16."""
    scale = min(1.0, MAX_SIDE / max(width, height))
    scale = max(scale, MIN_SIDE / min(width, height))

    def side(value: int) -> int:
        scaled = min(MAX_SIDE, max(MIN_SIDE, int(value * scale)))
        return scaled - scaled % SIDE_STEP

    return side(width), side(height)


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
FileRef = Annotated[str, Field(min_length=1, max_length=4096)]


class _ImageParams(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt
    n: Annotated[StrictInt, Field(ge=1, le=MAX_IMAGES)] = 1
    size: str | None = Field(
        default=None,
        description="WIDTHxHEIGHT, multiples of 16 in 256..2048; 'auto' or absent: 1024x1024 "
        "for a generation, the input image's size (fitted to those rules) for an edit.",
    )
    steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] | None = Field(
        default=None, description="Denoising steps; the model family's default when absent."
    )
    guidance: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)] | None = Field(
        default=None, description="Guidance scale; the family's default when absent."
    )
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = Field(
        default=None, description="Seed of the first image; random when absent."
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="Accepted, no effect: images are always stored as blobs."
    )
    output_format: Literal["png"] | None = None
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    model: str | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            parse_size(value)
        return value

    def dimensions(self) -> tuple[int, int] | None:
        """``(width, height)`` the job asks for, or None when it leaves the size to the model."""
        if self.size is None or self.size == "auto":
            return None
        return parse_size(self.size)


class ImageGenerationInput(_ImageParams):
    """An OpenAI ``/v1/images/generations`` request body."""


class ImageEditInput(_ImageParams):
    """An OpenAI ``/v1/images/edits`` request body, with the image (and mask) inline or by path."""

    image_path: FileRef | None = Field(
        default=None, description="A file under the worker's input folder, relative to it."
    )
    image: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        validate_default=True,
        description="The image (PNG, JPEG or WebP) as base64 or a data:<type>;base64,<data> URL.",
    )
    mask_path: FileRef | None = None
    mask: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        description="Where to repaint, the size of the image: transparent pixels (OpenAI's "
        "convention), or white pixels of a mask without transparency.",
    )
    image_strength: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = Field(
        default=None,
        description="Image-to-image on a generation model: how much of the input is kept "
        "(mflux's meaning; default 0.4).",
    )

    @field_validator("image")
    @classmethod
    def _one_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        return inline_or_path(value, info, name="image", what="image")

    @field_validator("mask")
    @classmethod
    def _one_mask(cls, value: str | None, info: ValidationInfo) -> str | None:
        return inline_or_path(value, info, name="mask", what=None)

    def has_mask(self) -> bool:
        """True when the job gives a mask, inline or by path."""
        return self.mask is not None or self.mask_path is not None
