"""Image generation and editing through mflux: ``image.generation`` and ``image.edit`` jobs.

Both catalog kinds (``image-generation``, ``image-edit``) use this module. The model family
(FLUX.1 schnell / dev / Kontext / Fill, Qwen-Image, Qwen-Image-Edit, Z-Image, Z-Image Turbo) is
read from the model directory by ``detect_family``; ``FAMILIES`` says, per family, which mflux
class and ``ModelConfig`` load it, how it takes an input image, and its default steps and
guidance. Every mflux name this module uses is in the block "the mflux API" below, and
``tests/test_images.py`` checks each against the installed mflux.

- ``prepare`` (worker process, no MLX): turns ``image_path`` / ``mask_path`` under the input
  folder into inline base64, and checks every image is a decodable PNG, JPEG or WebP.
- ``load`` / ``run`` (model process): ``open_pipeline`` builds the mflux object (the one seam a
  test replaces); ``run`` calls its ``generate_image`` once per image and replies with PNGs as
  base64.
- ``finish`` (worker process): moves each PNG into the blob store, so the job record holds only
  blob references.

Nothing is ever downloaded: the catalog's path is an existing local directory (mflux reads local
paths without the hub), and the model process sets ``HF_HUB_OFFLINE=1`` before importing mflux.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_fusion.config import Settings
from mlx_fusion.errors import (
    InferenceError,
    InputTooLarge,
    InvalidInput,
    ModelKindMismatch,
    ModelLoadError,
)
from mlx_fusion.jobs.blobs import BlobWriter
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.files import decode_base64, decode_data_url, read_input_file
from mlx_fusion.jobs.inputs.image import (
    DEFAULT_SIZE,
    MAX_SEED,
    ImageEditInput,
    ImageGenerationInput,
    fit_size,
)
from mlx_fusion.registry import cancel
from mlx_fusion.registry.catalog import ModelKind, ModelSpec
from mlx_fusion.registry.kinds.image_families import EditMode, Family, detect_family

JOB_KINDS = frozenset({Kind.IMAGE_GENERATION, Kind.IMAGE_EDIT})
"""The job kinds image models run (which one a given model takes: see ``check_job``)."""

MAX_INPUT_SIDE = 8192
"""Largest width or height of an input image or mask, in pixels."""
DEFAULT_IMAGE_STRENGTH = 0.4
"""Image-to-image: share of the input image kept when the job names none (mflux's default)."""
_NO_LIMIT = 1 << 62  # in the model process: the worker already enforced the size limits

# ----- the mflux API: every mflux name this module uses ------------------------------------------

MODEL_CONFIG = ("mflux.models.common.config.model_config", "ModelConfig")
"""Module and name of mflux's model configuration class (its static methods name each model)."""
GENERATED_IMAGE = ("mflux.utils.generated_image", "GeneratedImage")
"""What ``generate_image`` returns; the picture is its ``GENERATED_IMAGE_ATTR``, a PIL image."""
GENERATED_IMAGE_ATTR = "image"
PIPELINE_PARAMS = ("model_path", "quantize", "model_config", "lora_paths", "lora_scales")
"""Constructor parameters passed to every pipeline class (``pipeline_kwargs``)."""
GENERATE_PARAMS: Mapping[str, tuple[str, ...]] = {
    "text": ("seed", "prompt", "num_inference_steps", "width", "height", "guidance"),
    "img2img": ("image_path", "image_strength"),
    "reference": ("image_path",),
    "inpaint": ("image_path", "masked_image_path"),
    "references": ("image_paths", "image_path"),
}
"""``generate_image`` parameters passed: ``text`` always, plus those of the job's edit mode
(``generate_kwargs``)."""
QUANTIZE_BITS = (3, 4, 5, 6, 8)
"""The quantization widths mflux offers."""


def pipeline_class(family: Family) -> Any:
    """The mflux class of ``family`` (imports mflux, hence MLX: model process only)."""
    return getattr(importlib.import_module(family.module), family.cls)


def model_config(family: Family) -> Any:
    """mflux's ``ModelConfig`` of ``family``."""
    module, name = MODEL_CONFIG
    return getattr(getattr(importlib.import_module(module), name), family.config)()


def pipeline_kwargs(spec: ModelSpec, config: Any) -> dict[str, Any]:
    """The constructor arguments of the pipeline: the local directory, quantization, and the
    catalog's ``adapter_path`` as a LoRA file (scale 1)."""
    adapter = spec.adapter_path
    return {
        "model_path": str(spec.model_dir),
        "quantize": spec.quantize_bits,
        "model_config": config,
        "lora_paths": [str(adapter)] if adapter is not None else None,
        "lora_scales": [1.0] if adapter is not None else None,
    }


def generate_kwargs(
    mode: EditMode | Literal["text"],
    *,
    seed: int,
    prompt: str,
    steps: int,
    width: int,
    height: int,
    guidance: float | None,
    image_path: str | None = None,
    mask_path: str | None = None,
    image_strength: float | None = None,
) -> dict[str, Any]:
    """The keyword arguments of one ``generate_image`` call (names: ``GENERATE_PARAMS``)."""
    values: dict[str, Any] = {
        "seed": seed,
        "prompt": prompt,
        "num_inference_steps": steps,
        "width": width,
        "height": height,
        "guidance": guidance,
        "image_path": image_path,
        "image_paths": [image_path],
        "image_strength": image_strength,
        "masked_image_path": mask_path,
    }
    names = GENERATE_PARAMS["text"] + (GENERATE_PARAMS[mode] if mode != "text" else ())
    return {name: values[name] for name in names if name != "guidance" or guidance is not None}


# ----- loading (model process) -------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedImageModel:
    """A loaded mflux pipeline and what it is."""

    spec: ModelSpec
    family: Family
    pipeline: Any
    """An object with mflux's ``generate_image``."""


PipelineOpener = Callable[[Family, ModelSpec], Any]


def _hub_offline() -> None:
    """No Hugging Face download from this process, whatever mflux would do."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the variable at import
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


def open_pipeline(family: Family, spec: ModelSpec) -> Any:
    """The mflux object for ``spec`` (the one call into mflux at load time)."""
    _hub_offline()
    return pipeline_class(family)(**pipeline_kwargs(spec, model_config(family)))


def load(spec: ModelSpec, *, opener: PipelineOpener = open_pipeline) -> LoadedImageModel:
    """Load the catalog entry's model directory with the mflux class of its family."""
    path = spec.model_dir
    if not path.is_dir():
        raise ModelLoadError(f"model {spec.id!r}: directory {path} does not exist")
    try:
        family = detect_family(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"model {spec.id!r}: {e.message}") from e
    if spec.kind is ModelKind.IMAGE_GENERATION and not family.generates:
        raise ModelLoadError(
            f'model {spec.id!r}: {family.title} only edits images; list it with kind = "image-edit"'
        )
    if spec.quantize_bits is not None and spec.quantize_bits not in QUANTIZE_BITS:
        bits = ", ".join(str(b) for b in QUANTIZE_BITS)
        raise ModelLoadError(f"model {spec.id!r}: mflux quantizes to {bits} bits only")
    try:
        pipeline = opener(family, spec)
    except MemoryError:
        raise  # the model process reports it as out_of_memory
    except Exception as e:
        raise ModelLoadError(
            f"model {spec.id!r}: mflux could not load {family.title} from {path}: "
            f"{type(e).__name__}: {e}"
        ) from e
    watch_cancellation(pipeline)
    return LoadedImageModel(spec=spec, family=family, pipeline=pipeline)


class CancelCheck:
    """An mflux in-loop callback: a cancelled job stops at its next denoising step (the
    ``JobCancelled`` it raises leaves mflux's loop, which only catches ``KeyboardInterrupt``)."""

    def call_in_loop(
        self, t: int, seed: int, prompt: str, latents: Any, config: Any, time_steps: Any
    ) -> None:
        cancel.check()


def watch_cancellation(pipeline: Any) -> bool:
    """Register ``CancelCheck`` with the pipeline's mflux callback registry, when it has one."""
    callbacks = getattr(pipeline, "callbacks", None)
    if callbacks is None or not callable(getattr(callbacks, "register", None)):
        return False
    callbacks.register(CancelCheck())
    return True


# ----- images in and out (both processes) --------------------------------------------------------

_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the picture a quarter
_EXIF_ORIENTATION = 0x0112


def image_format(data: bytes) -> str | None:
    """``PNG``, ``JPEG`` or ``WEBP`` by the file's magic bytes, else None."""
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def image_size(data: bytes, *, field: str) -> tuple[int, int]:
    """(width, height) of a PNG, JPEG or WebP image as shown (EXIF rotation applied), after
    decoding it fully; ``InvalidInput`` naming ``field`` for anything else."""
    fmt = image_format(data)
    if fmt is None:
        raise InvalidInput("not a PNG, JPEG or WebP image", field=field)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if max(width, height) > MAX_INPUT_SIDE:
                raise InvalidInput(
                    f"{width}x{height} pixels; at most {MAX_INPUT_SIDE} a side", field=field
                )
            img.load()
            orientation = img.getexif().get(_EXIF_ORIENTATION)
    except InvalidInput:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise InvalidInput(f"cannot decode the {fmt} image: {e}", field=field) from e
    return (height, width) if orientation in _SWAPPED_ORIENTATIONS else (width, height)


def _inline_bytes(value: str, *, field: str, max_bytes: int) -> bytes:
    if value.startswith("data:"):
        _, data = decode_data_url(value, field=field, max_bytes=max_bytes)
    else:
        data = decode_base64(value, field=field, max_bytes=max_bytes)
    if not data:
        raise InvalidInput("the image is empty", field=field)
    return data


def repaint_mask_png(data: bytes) -> bytes:
    """mflux's mask (white: repaint, black: keep) as a grayscale PNG, from a job's mask: OpenAI's
    convention (transparent pixels are repainted) when the mask has any transparency, else its
    gray levels as they are. EXIF rotation is applied, as mflux applies it to the image."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        img = ImageOps.exif_transpose(opened)
        out = None
        if img.has_transparency_data:
            rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
            alpha = rgba.getchannel("A")
            lowest: Any = alpha.getextrema()[0]  # one band: (min, max)
            if lowest < 255:
                out = ImageOps.invert(alpha)
        if out is None:
            out = img.convert("L")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(picture: Any) -> bytes:
    """A PIL image as PNG bytes (no metadata)."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


# ----- the worker process: before and after the model --------------------------------------------


def _file_or_inline(
    inline: str | None, path: str | None, name: str, settings: Settings
) -> tuple[bytes, str]:
    """(bytes, field) of the image or mask a job gives inline or by path."""
    if path is not None:
        field = f"input.{name}_path"
        data = read_input_file(
            path, settings.input_dir, field=field, max_bytes=settings.max_file_bytes
        )
        if not data:
            raise InvalidInput(f"the {name} file is empty", field=field)
        return data, field
    assert inline is not None
    field = f"input.{name}"
    return _inline_bytes(inline, field=field, max_bytes=settings.max_file_bytes), field


def prepare(job: Job, settings: Settings) -> Job:
    """The edit job with its image and mask inline, as base64, each checked to be a decodable
    PNG, JPEG or WebP (the mask the size of the image). Runs in the worker process; a generation
    job passes unchanged."""
    job_input = job.input
    if not isinstance(job_input, ImageEditInput):
        return job
    image, image_field = _file_or_inline(job_input.image, job_input.image_path, "image", settings)
    size = image_size(image, field=image_field)
    body = {k: v for k, v in job.spec.input.items() if k not in ("image_path", "mask_path")}
    body["image"] = base64.b64encode(image).decode("ascii")
    total = len(image)
    if job_input.has_mask():
        mask, mask_field = _file_or_inline(job_input.mask, job_input.mask_path, "mask", settings)
        mask_size = image_size(mask, field=mask_field)
        if mask_size != size:
            raise InvalidInput(
                f"the mask is {mask_size[0]}x{mask_size[1]}, the image {size[0]}x{size[1]}; "
                "they must be the same size",
                field=mask_field,
            )
        body["mask"] = base64.b64encode(mask).decode("ascii")
        total += len(mask)
    if total > settings.max_file_bytes * 3 // 2:  # what the model process's job limit leaves
        raise InputTooLarge(
            f"image and mask together are {total} bytes; at most "
            f"{settings.max_file_bytes * 3 // 2} (1.5 x FUSION_MAX_FILE_BYTES)",
            field=image_field,
        )
    return Job(
        spec=job.spec.model_copy(update={"input": body}),
        kind=job.kind,
        input=ImageEditInput.model_validate(body),
    )


def finish(job: Job, result: dict[str, Any], put: BlobWriter) -> dict[str, Any]:
    """The result with each PNG moved into the blob store (``image-<i>.png``): every ``data``
    item's ``b64_json`` becomes ``blob_id``, ``bytes`` and ``content_type``."""
    data = []
    for i, item in enumerate(result.get("data") or []):
        encoded = item.get("b64_json")
        if not isinstance(encoded, str):
            raise InferenceError(f"image {i} of the model's reply has no b64_json")
        try:
            png = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InferenceError(f"image {i} of the model's reply is not base64: {e}") from e
        if image_format(png) != "PNG":
            raise InferenceError(f"image {i} of the model's reply is not a PNG")
        rest = {k: v for k, v in item.items() if k != "b64_json"}
        data.append({**put(f"image-{i}.png", png, "image/png"), **rest})
    return {**result, "data": data}


# ----- the model process: running a job ----------------------------------------------------------


def check_job(model: LoadedImageModel, job: Job) -> EditMode | Literal["text"]:
    """How ``model`` runs ``job``: ``text`` for a generation, its family's edit mode for an edit;
    ``ModelKindMismatch`` / ``InvalidInput`` when it cannot."""
    family, spec = model.family, model.spec
    job_input = job.input
    if not isinstance(job_input, ImageEditInput):
        if spec.kind is ModelKind.IMAGE_EDIT:
            raise ModelKindMismatch(
                f"model {spec.id!r} ({family.title}) is an image-edit model: it runs "
                "image.edit jobs",
                field="model",
            )
        return "text"
    mode = family.edit
    if job_input.has_mask() and mode != "inpaint":
        field = "input.mask" if job_input.mask is not None else "input.mask_path"
        raise InvalidInput(
            f"{family.title} takes no mask; only FLUX.1 Fill models repaint a masked area",
            field=field,
        )
    if mode == "inpaint" and not job_input.has_mask():
        raise InvalidInput(f"required: {family.title} repaints the area a mask marks", "input.mask")
    if job_input.image_strength is not None and mode != "img2img":
        raise InvalidInput(
            f"{family.title} takes no image_strength (only generation models editing by "
            "image-to-image do)",
            field="input.image_strength",
        )
    return mode


def run(model: LoadedImageModel, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make the job's images: (the OpenAI images response with each PNG as ``b64_json`` and its
    ``seed``, metrics)."""
    job_input = job.input
    assert isinstance(job_input, ImageGenerationInput | ImageEditInput)
    mode = check_job(model, job)
    family = model.family
    steps = job_input.steps or family.steps
    guidance = job_input.guidance if job_input.guidance is not None else family.guidance
    first_seed = job_input.seed if job_input.seed is not None else secrets.randbelow(MAX_SEED + 1)
    seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(job_input.n)]
    with tempfile.TemporaryDirectory(prefix="mlx-fusion-image-") as tmp:  # mode 0700
        image_path = mask_path = None
        size = job_input.dimensions()
        if isinstance(job_input, ImageEditInput):
            assert job_input.image is not None, "prepare inlines image_path"
            image = _inline_bytes(job_input.image, field="input.image", max_bytes=_NO_LIMIT)
            shown = image_size(image, field="input.image")
            size = size or fit_size(*shown)
            image_path = str(Path(tmp) / f"image.{str(image_format(image)).lower()}")
            Path(image_path).write_bytes(image)
            if job_input.mask is not None:
                mask = _inline_bytes(job_input.mask, field="input.mask", max_bytes=_NO_LIMIT)
                mask_path = str(Path(tmp) / "mask.png")
                Path(mask_path).write_bytes(repaint_mask_png(mask))
        width, height = size or DEFAULT_SIZE
        strength = job_input.image_strength if isinstance(job_input, ImageEditInput) else None
        start = time.perf_counter()
        data = []
        for seed in seeds:
            cancel.check()
            kwargs = generate_kwargs(
                mode,
                seed=seed,
                prompt=job_input.prompt,
                steps=steps,
                width=width,
                height=height,
                guidance=guidance,
                image_path=image_path,
                mask_path=mask_path,
                image_strength=(strength or DEFAULT_IMAGE_STRENGTH) if mode == "img2img" else None,
            )
            generated = model.pipeline.generate_image(**kwargs)
            png = png_bytes(getattr(generated, GENERATED_IMAGE_ATTR))
            data.append({"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed})
        elapsed_s = time.perf_counter() - start
    result = {
        "created": int(time.time()),
        "data": data,
        "size": f"{width}x{height}",
        "output_format": "png",
    }
    metrics = {
        "inference_ms": round(elapsed_s * 1000, 3),
        "images": len(data),
        "steps": steps,
        "seconds_per_step": round(elapsed_s / (len(data) * steps), 4),
    }
    return result, metrics
