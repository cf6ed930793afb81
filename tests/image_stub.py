"""A stand-in for the image kind with everything real except the mflux pipeline itself.

``load`` is ``mlx_fusion.registry.kinds.image.load`` with its one seam, the pipeline opener,
replaced: instead of mflux's class it builds a ``StubPipeline``, which checks every call against
the signature of the real mflux class the family names (constructor and ``generate_image``), then
draws a deterministic picture with Pillow. Family detection, input checks, ``prepare``, ``run``'s
result, ``finish`` and the blob store all run as in production. Spawned model processes import
this module by name (``tests`` is on ``sys.path`` through pytest's ``pythonpath``).

The picture: a background colour drawn from (prompt, seed), with a few rectangles; for an edit,
the input image scaled to the output size, with the area the mask marks for repainting (white in
mflux's mask) filled with that colour instead.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.kinds import image
from mlx_fusion.registry.kinds.image import JOB_KINDS, Family, finish, prepare, run

__all__ = ["JOB_KINDS", "StubPipeline", "finish", "load", "prepare", "run", "stub_colour"]


def stub_colour(prompt: str, seed: int) -> tuple[int, int, int]:
    """The background colour of the stub's picture for (prompt, seed)."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


@dataclass
class GeneratedPicture:
    """What mflux's ``generate_image`` returns, as far as the adapter reads it."""

    image: Image.Image


class StubPipeline:
    """An object with mflux's ``generate_image`` signature for ``family``'s class."""

    def __init__(self, family: Family, spec: ModelSpec) -> None:
        real = image.pipeline_class(family)
        inspect.signature(real.__init__).bind(None, **image.pipeline_kwargs(spec, None))
        self.family = family
        self._signature = inspect.signature(real.generate_image)
        self.calls: list[dict[str, Any]] = []

    def generate_image(self, **kwargs: Any) -> GeneratedPicture:
        unknown = set(kwargs) - set(self._signature.parameters)
        if unknown:
            raise TypeError(f"{self.family.cls}.generate_image has no parameter {unknown}")
        self._signature.bind(self, **kwargs)
        self.calls.append(kwargs)
        size = (kwargs["width"], kwargs["height"])
        colour = stub_colour(kwargs["prompt"], kwargs["seed"])
        generated = Image.new("RGB", size, colour)
        rng = random.Random(kwargs["seed"])
        draw = ImageDraw.Draw(generated)
        for _ in range(4):
            x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
            fill = tuple(rng.randrange(256) for _ in range(3))
            draw.rectangle((x, y, x + size[0] // 8, y + size[1] // 8), fill=fill)
        source = kwargs.get("image_path") or (kwargs.get("image_paths") or [None])[0]
        if source is None:
            return GeneratedPicture(generated)
        with Image.open(source) as opened:
            picture = opened.convert("RGB").resize(size)
        mask_path = kwargs.get("masked_image_path")
        if mask_path is not None:
            with Image.open(mask_path) as mask:
                repaint = mask.convert("L").resize(size).point(lambda v: 255 if v >= 128 else 0)
            picture.paste(Image.new("RGB", size, colour), (0, 0), repaint)
        return GeneratedPicture(picture)


def load(spec: ModelSpec) -> image.LoadedImageModel:
    """The real ``load``, with ``StubPipeline`` in place of the mflux class."""
    return image.load(spec, opener=StubPipeline)
