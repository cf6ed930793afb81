"""Image generation and edit jobs.

No FLUX weights can be had here, so the tests come in three parts:

- a contract test: every mflux class, ``ModelConfig`` factory and parameter the adapter uses (the
  table in ``mlx_fusion.registry.kinds.image``) exists in the installed mflux with that name, and
  the calls the adapter builds bind to the real signatures;
- end to end through Redis -> worker -> model process -> blob store, with ``image_stub`` in place
  of the kind module: the real adapter except the mflux pipeline, which draws with Pillow (and
  checks every call against the real mflux signature);
- a real mflux load of a directory without weights, which must fail with ``model_load_failed``.

The end-to-end jobs of this file run in one worker run (one model process per catalog model);
each bad job is followed by a good one, which must still complete.
"""

from __future__ import annotations

import base64
import datetime as dt
import inspect
import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import image_stub
import pytest
from conftest import build_worker, make_store, worker_settings, write_catalog
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from mlx_fusion.client import Client
from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.errors import FusionError, ModelLoadError
from mlx_fusion.jobs.inputs.image import fit_size, parse_size
from mlx_fusion.jobs.store import JobStore, utcnow
from mlx_fusion.registry.catalog import ModelKind, ModelSpec
from mlx_fusion.registry.kinds import image, image_families
from mlx_fusion.worker import FusionWorker

STUB_KINDS = {ModelKind.IMAGE_GENERATION: image_stub, ModelKind.IMAGE_EDIT: image_stub}
PHOTO_SIZE = (320, 256)
PHOTO_COLOUR = (20, 90, 200)
JPEG_SIZE = (300, 200)
MAX_RECORD_STRING = 300
"""No string in a job record (outside an inline edit's own input) may be longer: no image bytes."""


# ----- pictures and model directories ------------------------------------------------------------


def picture(
    size: tuple[int, int], colour: tuple[int, ...], *, fmt: str = "PNG", **options: Any
) -> bytes:
    mode = "RGBA" if len(colour) == 4 else "RGB"
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt, **options)
    return buf.getvalue()


def openai_mask(size: tuple[int, int]) -> bytes:
    """OpenAI's convention: the transparent left half is repainted, the opaque right half kept."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PHOTO = picture(PHOTO_SIZE, PHOTO_COLOUR)
MASK = openai_mask(PHOTO_SIZE)


def model_dir(
    root: Path, name: str, pipeline: str | None = None, transformer: dict[str, Any] | None = None
) -> Path:
    """A model directory: a diffusers ``model_index.json`` and transformer config, no weights."""
    path = root / name
    (path / "transformer").mkdir(parents=True)
    if pipeline is not None:
        (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    if transformer is not None:
        (path / "transformer" / "config.json").write_text(json.dumps(transformer))
    return path


def flux_transformer(*, guidance: bool, in_channels: int = 64) -> dict[str, Any]:
    return {
        "_class_name": "FluxTransformer2DModel",
        "guidance_embeds": guidance,
        "in_channels": in_channels,
    }


# ----- the jobs ----------------------------------------------------------------------------------

GEN = ("image.generation", "schnell")
NEXT_GEN = {"prompt": "next", "size": "256x256", "steps": 1}
NEXT_FILL = {"prompt": "next", "image": data_url(PHOTO), "mask": data_url(MASK), "steps": 1}
NEXT_KONTEXT = {"prompt": "next", "image": data_url(PHOTO), "steps": 1}

GOOD_JOBS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gen-two": (*GEN, {"prompt": "a red fox", "n": 2, "size": "512x256", "seed": 7, "steps": 2}),
    "gen-default": (*GEN, {"prompt": "a lighthouse"}),
    "gen-openai-fields": (
        *GEN,
        {
            "prompt": "a boat",
            "size": "256x256",
            "response_format": "url",
            "quality": "hd",
            "style": "vivid",
            "output_format": "png",
            "model": "dall-e-3",
            "user": "u1",
        },
    ),
    "fill-inline": (
        "image.edit",
        "fill",
        {"prompt": "a cat", "image": data_url(PHOTO), "mask": data_url(MASK), "seed": 3},
    ),
    "fill-path": (
        "image.edit",
        "fill",
        {"prompt": "a cat", "image_path": "photo.png", "mask_path": "masks/mask.png", "seed": 3},
    ),
    "kontext": (
        "image.edit",
        "kontext",
        {
            "prompt": "make it night",
            "image": base64.b64encode(
                picture(PHOTO_SIZE, PHOTO_COLOUR, fmt="WEBP", lossless=True)
            ).decode(),
            "size": "512x512",
        },
    ),
    "img2img": (
        "image.edit",
        "schnell",
        {"prompt": "a storm", "image": data_url(PHOTO), "image_strength": 0.7, "steps": 2},
    ),
    "qwen-edit-jpeg": ("image.edit", "qwen-edit", {"prompt": "add a hat", "image_path": "pic.jpg"}),
}

BAD_JOBS: dict[str, tuple[str, str, dict[str, Any], str, str, dict[str, Any]]] = {
    # name: (kind, model, input, then the next job: kind, model, input)
    "missing-prompt": (*GEN, {"n": 1}, *GEN, NEXT_GEN),
    "blank-prompt": (*GEN, {"prompt": "   "}, *GEN, NEXT_GEN),
    "n5": (*GEN, {"prompt": "x", "n": 5}, *GEN, NEXT_GEN),
    "size-1000": (*GEN, {"prompt": "x", "size": "1000x1000"}, *GEN, NEXT_GEN),
    "size-12": (*GEN, {"prompt": "x", "size": "12x12"}, *GEN, NEXT_GEN),
    "size-words": (*GEN, {"prompt": "x", "size": "large"}, *GEN, NEXT_GEN),
    "unknown-field": (*GEN, {"prompt": "x", "negative_prompt": "blur"}, *GEN, NEXT_GEN),
    "undecodable": (
        "image.edit",
        "fill",
        {"prompt": "x", "image": data_url(random.Random(0).randbytes(512)), "mask": data_url(MASK)},
        "image.edit",
        "fill",
        NEXT_FILL,
    ),
    "truncated-png": (
        "image.edit",
        "fill",
        {"prompt": "x", "image": data_url(PHOTO[:100]), "mask": data_url(MASK)},
        "image.edit",
        "fill",
        NEXT_FILL,
    ),
    "outside-input-dir": (
        "image.edit",
        "fill",
        {"prompt": "x", "image_path": "../secret.png", "mask_path": "masks/mask.png"},
        "image.edit",
        "fill",
        NEXT_FILL,
    ),
    "edit-without-image": ("image.edit", "kontext", {"prompt": "x"}, *GEN, NEXT_GEN),
    "mask-size": (
        "image.edit",
        "fill",
        {"prompt": "x", "image": data_url(PHOTO), "mask": data_url(openai_mask((64, 64)))},
        "image.edit",
        "fill",
        NEXT_FILL,
    ),
    "fill-without-mask": (
        "image.edit",
        "fill",
        {"prompt": "x", "image": data_url(PHOTO)},
        "image.edit",
        "fill",
        NEXT_FILL,
    ),
    "kontext-with-mask": (
        "image.edit",
        "kontext",
        {"prompt": "x", "image": data_url(PHOTO), "mask": data_url(MASK)},
        "image.edit",
        "kontext",
        NEXT_KONTEXT,
    ),
    "strength-on-kontext": (
        "image.edit",
        "kontext",
        {"prompt": "x", "image": data_url(PHOTO), "image_strength": 0.5},
        "image.edit",
        "kontext",
        NEXT_KONTEXT,
    ),
    "generation-on-edit-model": (
        "image.generation",
        "kontext",
        {"prompt": "x"},
        "image.edit",
        "kontext",
        NEXT_KONTEXT,
    ),
}


def job(job_id: str, kind: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "kind": kind, "model": model, "input": body}


def enqueue_raw(redis: Redis, document: dict[str, Any]) -> None:
    """Enqueue without the client's validation, as a careless Tier 2 might."""
    Queue("fusion:default", connection=redis, serializer=JSONSerializer).enqueue_call(
        func=JOB_FUNCTION, args=[document], job_id=document["id"]
    )


def stub_catalog(root: Path) -> Path:
    models = root / "models"
    dirs = {
        "schnell": (
            "image-generation",
            model_dir(models, "FLUX.1-schnell", "FluxPipeline", flux_transformer(guidance=False)),
        ),
        "fill": (
            "image-edit",
            model_dir(
                models,
                "FLUX.1-Fill-dev",
                "FluxFillPipeline",
                flux_transformer(guidance=True, in_channels=384),
            ),
        ),
        "kontext": (
            "image-edit",
            model_dir(models, "FLUX.1-Kontext-dev", "FluxKontextPipeline"),
        ),
        "qwen-edit": (
            "image-edit",
            model_dir(models, "Qwen-Image-Edit-2509", "QwenImageEditPlusPipeline"),
        ),
    }
    return write_catalog(
        root / "models.toml",
        {name: {"kind": kind, "path": path} for name, (kind, path) in dirs.items()},
    )


class Run:
    """The outcome of the module's worker run."""

    def __init__(self, client: Client, store: JobStore) -> None:
        self.client = client
        self.store = store

    def record(self, name: str) -> dict[str, Any]:
        doc = self.client.get(name)
        assert doc is not None, name
        return doc

    def completed(self, name: str) -> dict[str, Any]:
        doc = self.record(name)
        assert doc["status"] == "completed", doc.get("error")
        return doc

    def image(self, name: str, index: int = 0) -> Image.Image:
        png = self.client.get_image(name, index)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        return Image.open(io.BytesIO(png))


@pytest.fixture(scope="module")
def run(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Every job of GOOD_JOBS and BAD_JOBS through one worker run with the stub kind.

    Module-scoped (conftest's worker fixtures are per test) so each model process starts once."""
    tmp = tmp_path_factory.mktemp("images")
    inputs = tmp / "inputs"
    (inputs / "masks").mkdir(parents=True)
    (inputs / "photo.png").write_bytes(PHOTO)
    (inputs / "masks" / "mask.png").write_bytes(MASK)
    (inputs / "pic.jpg").write_bytes(picture(JPEG_SIZE, PHOTO_COLOUR, fmt="JPEG"))
    (tmp / "secret.png").write_bytes(PHOTO)
    settings = worker_settings(redis_url, tmp / "data", stub_catalog(tmp), input_dir=inputs)
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    store = make_store("mongomock", tmp)
    client = Client(settings, redis, store)
    for name, (kind, model, body) in GOOD_JOBS.items():
        client.submit(job(name, kind, model, body))
    for name, (kind, model, body, next_kind, next_model, next_body) in BAD_JOBS.items():
        enqueue_raw(redis, job(name, kind, model, body))
        client.submit(job(f"{name}-next", next_kind, next_model, next_body))
    worker = build_worker(settings, redis, store, STUB_KINDS)
    worker.work(burst=True)
    yield Run(client, store)
    redis.flushdb()


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# ----- end to end: generations -------------------------------------------------------------------


def test_generation_with_n_2_stores_two_pngs_of_the_asked_size(run: Run) -> None:
    first, second = run.image("gen-two", 0), run.image("gen-two", 1)
    assert first.format == second.format == "PNG"
    assert first.size == second.size == (512, 256)
    assert first.tobytes() != second.tobytes()


def test_image_i_uses_seed_plus_i(run: Run) -> None:
    result = run.completed("gen-two")["result"]
    assert [item["seed"] for item in result["data"]] == [7, 8]
    for i, seed in enumerate((7, 8)):
        corner = run.image("gen-two", i).convert("RGB").getpixel((511, 255))
        assert corner == image_stub.stub_colour("a red fox", seed)


def test_result_holds_blob_references_shaped_like_openai(run: Run) -> None:
    record = run.completed("gen-two")
    result = record["result"]
    assert isinstance(result["created"], int) and result["size"] == "512x256"
    assert result["output_format"] == "png"
    for item in result["data"]:
        assert set(item) == {"blob_id", "bytes", "content_type", "seed"}
        assert item["content_type"] == "image/png"
        assert item["bytes"] == len(run.client.get_blob(item["blob_id"]))


def test_job_record_holds_no_image_bytes(run: Run) -> None:
    for name in ("gen-two", "gen-default", "fill-path", "qwen-edit-jpeg"):
        record = run.completed(name)
        assert max(len(s) for s in strings(record)) <= MAX_RECORD_STRING, name
    inline = run.completed("fill-inline")  # its input is the caller's own data URL
    assert max(len(s) for s in strings(inline["result"])) <= MAX_RECORD_STRING


def test_generation_defaults_to_1024_square_and_the_family_steps(run: Run) -> None:
    record = run.completed("gen-default")
    assert run.image("gen-default").size == (1024, 1024)
    assert record["result"]["size"] == "1024x1024"
    assert len(record["result"]["data"]) == 1
    assert 0 <= record["result"]["data"][0]["seed"] < 2**32
    metrics = record["metrics"]
    assert metrics["steps"] == 4  # FLUX.1 schnell
    assert metrics["images"] == 1
    assert metrics["inference_ms"] > 0 and metrics["seconds_per_step"] > 0
    assert metrics["load_ms"] >= 0 and metrics["queue_wait_ms"] >= 0


def test_openai_response_format_quality_style_model_user_are_accepted(run: Run) -> None:
    assert run.image("gen-openai-fields").size == (256, 256)


# ----- end to end: edits -------------------------------------------------------------------------


def test_fill_repaints_the_transparent_half_of_an_openai_mask(run: Run) -> None:
    picture_ = run.image("fill-inline").convert("RGB")
    assert picture_.size == PHOTO_SIZE  # an edit keeps its input's size
    width, height = PHOTO_SIZE
    assert picture_.getpixel((width - 1, height // 2)) == PHOTO_COLOUR
    assert picture_.getpixel((0, height // 2)) == image_stub.stub_colour("a cat", 3)


def test_image_and_mask_by_path_give_the_same_picture_as_inline(run: Run) -> None:
    inline = run.client.get_image("fill-inline")
    assert run.client.get_image("fill-path") == inline


def test_kontext_edit_takes_plain_base64_webp_and_the_asked_size(run: Run) -> None:
    edited = run.image("kontext").convert("RGB")
    assert edited.size == (512, 512)
    assert edited.getpixel((256, 256)) == PHOTO_COLOUR


def test_generation_model_edits_by_image_to_image(run: Run) -> None:
    edited = run.image("img2img").convert("RGB")
    assert edited.size == PHOTO_SIZE
    assert edited.getpixel((10, 10)) == PHOTO_COLOUR
    assert run.completed("img2img")["metrics"]["steps"] == 2


def test_small_jpeg_edit_is_fitted_to_the_size_rules(run: Run) -> None:
    assert run.image("qwen-edit-jpeg").size == fit_size(*JPEG_SIZE) == (384, 256)


# ----- bad inputs --------------------------------------------------------------------------------

BAD_CASES = [
    ("missing-prompt", "invalid_input", "input.prompt", "required"),
    ("blank-prompt", "invalid_input", "input.prompt", "blank"),
    ("n5", "invalid_input", "input.n", "4"),
    ("size-1000", "invalid_input", "input.size", "multiple of 16"),
    ("size-12", "invalid_input", "input.size", "256..2048"),
    ("size-words", "invalid_input", "input.size", "WIDTHxHEIGHT"),
    ("unknown-field", "invalid_input", "input.negative_prompt", "not permitted"),
    ("undecodable", "invalid_input", "input.image", "not a PNG, JPEG or WebP"),
    ("truncated-png", "invalid_input", "input.image", "cannot decode"),
    ("outside-input-dir", "input_path_not_allowed", "input.image_path", "outside"),
    ("edit-without-image", "invalid_input", "input.image", "image_path"),
    ("mask-size", "invalid_input", "input.mask", "same size"),
    ("fill-without-mask", "invalid_input", "input.mask", "FLUX.1 Fill"),
    ("kontext-with-mask", "invalid_input", "input.mask", "takes no mask"),
    ("strength-on-kontext", "invalid_input", "input.image_strength", "image_strength"),
    ("generation-on-edit-model", "model_kind_mismatch", "model", "image-edit"),
]


@pytest.mark.parametrize(("name", "code", "field", "words"), BAD_CASES)
def test_bad_input_fails_precisely_and_the_next_job_completes(
    run: Run, name: str, code: str, field: str, words: str
) -> None:
    error = run.record(name)["error"]
    assert run.record(name)["status"] == "failed"
    assert (error["code"], error.get("field")) == (code, field), error
    assert words in error["message"], error
    assert run.completed(f"{name}-next")["result"]["data"]


def test_every_bad_job_has_a_case() -> None:
    assert {case[0] for case in BAD_CASES} == set(BAD_JOBS)


# ----- blob expiry and real loads (a worker per test) --------------------------------------------


def test_images_expire_with_their_job(
    make_worker: Callable[..., FusionWorker], client: Client, store: JobStore, tmp_path: Path
) -> None:
    catalog = stub_catalog(tmp_path)
    client.submit(job("expiring", *GEN, {"prompt": "x", "n": 2, "size": "256x256", "steps": 1}))
    make_worker(kinds=STUB_KINDS, catalog_path=catalog).work(burst=True)
    assert client.get_image("expiring", 1)
    assert store.blobs is not None
    assert store.blobs.purge_expired(utcnow()) == 0
    assert store.blobs.purge_expired(utcnow() + store.retention + dt.timedelta(minutes=1)) == 2
    for index in (0, 1):
        with pytest.raises(FusionError, match="no blob"):
            client.get_image("expiring", index)


def test_real_mflux_load_without_weights_fails_with_model_load_failed(
    make_worker: Callable[..., FusionWorker],
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("mflux")
    hub = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hub))  # the spawned model process inherits it
    models = tmp_path / "models"
    catalog = write_catalog(
        tmp_path / "models.toml",
        {
            "no-weights": {
                "kind": "image-generation",
                "path": model_dir(
                    models, "FLUX.1-schnell", "FluxPipeline", flux_transformer(guidance=False)
                ),
            },
            "mystery": {"kind": "image-generation", "path": model_dir(models, "weights")},
            "kontext-as-generator": {
                "kind": "image-generation",
                "path": model_dir(models, "FLUX.1-Kontext-dev", "FluxKontextPipeline"),
            },
        },
    )
    names = ("no-weights", "mystery", "kontext-as-generator")
    for model in names:
        client.submit(job(model, "image.generation", model, {"prompt": "x"}))
    make_worker(catalog_path=catalog).work(burst=True)  # the real image kind
    errors = {model: client.get(model)["error"] for model in names}
    assert {e["code"] for e in errors.values()} == {"model_load_failed"}
    assert "mflux could not load FLUX.1 schnell" in errors["no-weights"]["message"]
    assert "No safetensors files found" in errors["no-weights"]["message"]
    assert "cannot tell which mflux model family" in errors["mystery"]["message"]
    assert 'kind = "image-edit"' in errors["kontext-as-generator"]["message"]
    assert not hub.exists() or not any(hub.rglob("*")), "something was downloaded"


# ----- the mflux contract ------------------------------------------------------------------------


def test_every_mflux_name_the_adapter_uses_exists_with_that_signature(tmp_path: Path) -> None:
    pytest.importorskip("mflux")
    module, name = image.GENERATED_IMAGE
    generated_cls = getattr(__import__(module, fromlist=[name]), name)
    spec = ModelSpec(
        id="m",
        kind=ModelKind.IMAGE_GENERATION,
        path=tmp_path,
        quantize_bits=4,
        adapter_path=tmp_path / "lora.safetensors",
    )
    for family in image_families.FAMILIES.values():
        cls = image.pipeline_class(family)
        config = image.model_config(family)
        assert type(config).__name__ == image.MODEL_CONFIG[1], family.id
        init = inspect.signature(cls.__init__)
        kwargs = image.pipeline_kwargs(spec, config)
        assert set(kwargs) == set(image.PIPELINE_PARAMS)
        assert set(kwargs) <= set(init.parameters), (family.id, set(kwargs) - set(init.parameters))
        init.bind(None, **kwargs)
        generate = inspect.signature(cls.generate_image)
        modes = ["text", family.edit] if family.generates else [family.edit]
        for mode in modes:
            call = image.generate_kwargs(
                mode,
                seed=1,
                prompt="p",
                steps=2,
                width=256,
                height=256,
                guidance=1.0,
                image_path="/i.png",
                mask_path="/m.png",
                image_strength=0.4,
            )
            expected = image.GENERATE_PARAMS["text"] + (
                image.GENERATE_PARAMS[mode] if mode != "text" else ()
            )
            assert set(call) == set(expected), (family.id, mode)
            missing = set(call) - set(generate.parameters)
            assert not missing, f"{cls.__name__}.generate_image lacks {missing}"
            generate.bind(None, **call)
        assert generate.return_annotation in (generated_cls, generated_cls.__name__), family.id
    picture_ = Image.new("RGB", (16, 16))
    made = generated_cls(
        image=picture_,
        model_config=image.model_config(image_families.FAMILIES["flux1-schnell"]),
        seed=1,
        prompt="p",
        steps=1,
        guidance=None,
        precision=None,
        quantization=0,
        generation_time=0.0,
    )
    assert getattr(made, image.GENERATED_IMAGE_ATTR) is picture_


def test_the_stub_refuses_a_parameter_mflux_lacks(tmp_path: Path) -> None:
    pytest.importorskip("mflux")
    spec = ModelSpec(id="m", kind=ModelKind.IMAGE_GENERATION, path=tmp_path)
    stub = image_stub.StubPipeline(image_families.FAMILIES["flux1-kontext"], spec)
    with pytest.raises(TypeError, match="masked_image_path"):
        stub.generate_image(
            **image.generate_kwargs(
                "inpaint", seed=1, prompt="p", steps=1, width=256, height=256, guidance=None
            )
        )


# ----- pure functions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pipeline", "transformer", "family"),
    [
        ("x", "FluxPipeline", flux_transformer(guidance=False), "flux1-schnell"),
        ("x", "FluxPipeline", flux_transformer(guidance=True), "flux1-dev"),
        ("x", "FluxKontextPipeline", None, "flux1-kontext"),
        ("x", "FluxFillPipeline", None, "flux1-fill"),
        ("x", "QwenImagePipeline", None, "qwen-image"),
        ("x", "QwenImageEditPlusPipeline", None, "qwen-image-edit"),
        ("Qwen-Image-Edit-2511", "QwenImageEditPlusPipeline", None, "qwen-image-edit-2511"),
        ("Z-Image-Turbo", "ZImagePipeline", None, "z-image-turbo"),
        ("Z-Image", "ZImagePipeline", None, "z-image"),
        # snapshots mflux downloads have only the transformer config
        ("x", None, flux_transformer(guidance=True, in_channels=384), "flux1-fill"),
        ("flux.1-kontext-dev", None, flux_transformer(guidance=True), "flux1-kontext"),
        ("x", None, {"_class_name": "QwenImageTransformer2DModel"}, "qwen-image"),
        # mflux-saved (quantized) checkpoints: the name alone
        ("FLUX.1-schnell-mflux-4bit", None, None, "flux1-schnell"),
        ("flux1-dev-q8", None, None, "flux1-dev"),
        ("qwen-image-edit-4bit", None, None, "qwen-image-edit"),
        ("zimage-turbo-q4", None, None, "z-image-turbo"),
    ],
)
def test_family_is_read_from_the_model_directory(
    tmp_path: Path, name: str, pipeline: str | None, transformer: Any, family: str
) -> None:
    assert (
        image_families.detect_family(model_dir(tmp_path, name, pipeline, transformer)).id == family
    )


def test_family_of_a_hugging_face_cache_snapshot_comes_from_the_repository_name(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "models--black-forest-labs--FLUX.1-Kontext-dev" / "snapshots"
    path = model_dir(repo, "0123abcd", None, flux_transformer(guidance=True))
    assert image_families.detect_family(path).id == "flux1-kontext"


@pytest.mark.parametrize(
    ("name", "words"),
    [("my-finetune", "which mflux model family"), ("flux-finetune", "FLUX.1 schnell from dev")],
)
def test_an_undecidable_directory_fails_to_load_with_the_reason(
    tmp_path: Path, name: str, words: str
) -> None:
    with pytest.raises(ModelLoadError, match=words):
        image_families.detect_family(model_dir(tmp_path, name))


def test_size_rules() -> None:
    assert parse_size("1024x768") == (1024, 768)
    for bad in ("1000x1000", "12x12", "4096x1024", "1024", "1024X768"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert fit_size(320, 256) == (320, 256)
    assert fit_size(4000, 3000) == (2048, 1536)
    assert fit_size(64, 48) == (336, 256)
    assert fit_size(10_000, 100) == (2048, 256)


def test_image_size_is_read_as_shown_after_exif_rotation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), PHOTO_COLOUR).save(buf, format="JPEG", exif=exif)
    assert image.image_size(buf.getvalue(), field="input.image") == (200, 300)


def mask_pixels(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(image.repaint_mask_png(data))) as mask:
        return mask.getpixel((0, 0)), mask.getpixel((mask.width - 1, 0))


def test_masks_follow_openai_transparency_else_white_means_repaint() -> None:
    assert mask_pixels(MASK) == (255, 0)  # transparent left half: repaint
    grey = Image.new("L", (32, 32), 0)
    grey.paste(255, (0, 0, 16, 32))
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    assert mask_pixels(buf.getvalue()) == (255, 0)  # no transparency: white repaints
    opaque = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (0, 0, 16, 32))
    buf = io.BytesIO()
    opaque.save(buf, format="PNG")
    assert mask_pixels(buf.getvalue()) == (255, 0)  # alpha all opaque: read as grey levels


def test_a_cancelled_image_job_stops_at_the_next_denoising_step() -> None:
    from types import SimpleNamespace

    from mflux.callbacks.callback_registry import CallbackRegistry

    from mlx_fusion.errors import JobCancelled
    from mlx_fusion.registry import cancel
    from mlx_fusion.registry.kinds.image import watch_cancellation

    pipeline = SimpleNamespace(callbacks=CallbackRegistry())  # what mflux models carry
    assert watch_cancellation(pipeline)
    steps = [0, 1, 2]
    ctx = pipeline.callbacks.start(seed=1, prompt="a fox", config=SimpleNamespace(time_steps=steps))
    ctx.in_loop(0, latents=None, time_steps=steps)  # not cancelled: the loop goes on
    cancel.flag().set()
    try:
        with pytest.raises(JobCancelled):
            ctx.in_loop(1, latents=None, time_steps=steps)
    finally:
        cancel.flag().clear()
    assert not watch_cancellation(SimpleNamespace())  # a pipeline without callbacks
