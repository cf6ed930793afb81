"""Vision-language models through mlx-vlm: chat completions whose messages may hold images.

Exports the names every kind module has: ``JOB_KINDS``, ``load(spec)``, ``prepare(job,
settings)`` and ``run(model, job)``. ``prepare`` (worker process) turns every image part into an
inline ``data:`` URL: a ``file:`` reference is read from the input folder, and every image must be
PNG, JPEG or WebP and decode. ``run`` (model process) decodes the data URLs to PIL images in
memory and generates with mlx-vlm. MLX and mlx-vlm are imported inside the functions.

Inputs are prepared by calling the model's processor with text and images only: mlx-vlm's own
input preparation passes ``padding`` to the processor, which mlx-vlm 0.7.10's llava processor
forwards to the image processor, and transformers >= 5.20 refuses it.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlx_fusion.errors import InvalidInput, ModelLoadError
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.files import decode_data_url, read_input_file
from mlx_fusion.jobs.inputs import ChatCompletionInput
from mlx_fusion.jobs.inputs.text import ImagePart
from mlx_fusion.registry import cancel
from mlx_fusion.registry.catalog import ModelSpec
from mlx_fusion.registry.kinds.lm import Generation, completion_object, earliest_stop

if TYPE_CHECKING:
    from mlx_fusion.config import Settings

JOB_KINDS = frozenset({Kind.CHAT_COMPLETION})
"""The job kinds a vision-language model runs."""

IMAGE_TYPES: dict[bytes, str] = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
}
"""Magic bytes of the accepted image formats (WebP is checked apart: RIFF....WEBP)."""

MAX_IMAGES = 16
"""Most images in one job."""


@dataclass(frozen=True)
class LoadedVLM:
    """A loaded mlx-vlm model with its processor."""

    spec: ModelSpec
    model: Any
    processor: Any


def load(spec: ModelSpec) -> LoadedVLM:
    """Load the model directory named by the catalog entry."""
    path = spec.model_dir
    if not path.is_dir():
        raise ModelLoadError(f"model {spec.id!r}: directory {path} does not exist")
    try:
        from mlx_vlm.utils import load as load_vlm

        model, processor = load_vlm(
            str(path),
            adapter_path=str(spec.adapter_path) if spec.adapter_path else None,
            trust_remote_code=spec.trust_remote_code,
        )
    except Exception as e:
        raise ModelLoadError(f"model {spec.id!r}: {type(e).__name__}: {e}") from e
    return LoadedVLM(spec=spec, model=model, processor=processor)


# ----- the worker process ---------------------------------------------------------------------


def image_type(data: bytes) -> str | None:
    """``image/png``, ``image/jpeg`` or ``image/webp`` from the magic bytes, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in IMAGE_TYPES.items() if data.startswith(magic)), None)


def check_image(data: bytes, *, field: str) -> str:
    """The MIME type of an accepted image that decodes; ``InvalidInput`` otherwise."""
    mime = image_type(data)
    if mime is None:
        raise InvalidInput("not a PNG, JPEG or WebP image", field=field)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as e:
        raise InvalidInput(
            f"the image does not decode: {type(e).__name__}: {e}", field=field
        ) from e
    return mime


def _inline_image(part: ImagePart, settings: Settings, field: str) -> str:
    url = part.image_url.url
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise InvalidInput(
            "remote images are not fetched; send a data: URL or a file: path in the input folder",
            field=field,
        )
    ref = part.image_url.file_ref()
    if ref is not None:
        data = read_input_file(
            ref, settings.input_dir, field=field, max_bytes=settings.max_file_bytes
        )
    elif scheme == "data":
        _, data = decode_data_url(url, field=field, max_bytes=settings.max_file_bytes)
    else:
        raise InvalidInput("expected a data:image/...;base64, URL or a file:<path>", field=field)
    mime = check_image(data, field=field)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def prepare(job: Job, settings: Settings) -> Job:
    """The job with every image inline as a checked ``data:`` URL (``file:`` references read from
    the input folder). Runs in the worker process."""
    job_input = job.input
    assert isinstance(job_input, ChatCompletionInput)
    messages = [dict(m) for m in job.spec.input["messages"]]
    count = 0
    for n, message in enumerate(job_input.messages):
        images = message.images()
        if not images:
            continue
        if message.role != "user":
            raise InvalidInput("only user messages may hold images", field=f"input.messages.{n}")
        parts = [dict(p) for p in messages[n]["content"]]
        for m, part in images:
            field = f"input.messages.{n}.content.{m}.image_url.url"
            count += 1
            if count > MAX_IMAGES:
                raise InvalidInput(f"at most {MAX_IMAGES} images per job", field="input.messages")
            parts[m] = {
                **parts[m],
                "image_url": {**parts[m]["image_url"], "url": _inline_image(part, settings, field)},
            }
        messages[n] = {**messages[n], "content": parts}
    if count == 0:
        return job
    body = {**job.spec.input, "messages": messages}
    return Job(
        spec=job.spec.model_copy(update={"input": body}),
        kind=job.kind,
        input=ChatCompletionInput.model_validate(body),
    )


# ----- the model process ----------------------------------------------------------------------


def _decode_images(job_input: ChatCompletionInput) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages for the chat template, the images as PIL images in order)."""
    from PIL import Image

    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for n, message in enumerate(job_input.messages):
        out = message.template_dict()
        if isinstance(message.content, list):
            content: list[dict[str, Any]] = []
            for m, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    field = f"input.messages.{n}.content.{m}.image_url.url"
                    _, data = decode_data_url(part.image_url.url, field=field, max_bytes=1 << 40)
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": part.text})
            out["content"] = content
        messages.append(out)
    return messages, images


def _prompt(vlm: LoadedVLM, messages: list[dict[str, Any]]) -> str:
    processor = vlm.processor
    owner = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    if getattr(owner, "chat_template", None) is None:
        raise InvalidInput(f"model {vlm.spec.id!r} has no chat template", field="kind")
    try:
        prompt: str = owner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:
        raise InvalidInput(
            f"the chat template of model {vlm.spec.id!r} refused the messages: "
            f"{type(e).__name__}: {e}",
            field="input.messages",
        ) from e
    return prompt


def generate(vlm: LoadedVLM, job_input: ChatCompletionInput) -> Generation:
    """Run the model on the job's messages and images, honouring stop sequences."""
    import mlx.core as mx
    from mlx_vlm.generate.dispatch import stream_generate

    messages, images = _decode_images(job_input)
    prompt = _prompt(vlm, messages)
    inputs = vlm.processor(text=[prompt], images=images or None, return_tensors="mlx")
    input_ids = mx.array(inputs["input_ids"])
    pixel_values = inputs.get("pixel_values")
    mask = inputs.get("attention_mask")
    if job_input.seed is not None:
        mx.random.seed(job_input.seed)
    stops = job_input.stop_sequences()
    longest_stop = max((len(s) for s in stops), default=0)
    sampling: dict[str, Any] = {
        "temperature": job_input.temperature,
        "top_p": job_input.top_p,
        "min_p": job_input.min_p,
    }
    if job_input.top_k:
        sampling["top_k"] = job_input.top_k
    if job_input.repetition_penalty is not None:
        sampling["repetition_penalty"] = job_input.repetition_penalty
    text = ""
    prompt_tokens = int(input_ids.size)
    completion_tokens = 0
    finish_reason = "length"
    start = time.perf_counter()
    for response in stream_generate(
        vlm.model,
        vlm.processor,
        prompt,
        input_ids=input_ids,
        pixel_values=None if pixel_values is None else mx.array(pixel_values),
        mask=None if mask is None else mx.array(mask),
        max_tokens=job_input.token_limit(vlm.spec.default_max_tokens),
        **sampling,
    ):
        cancel.check()
        search_from = max(0, len(text) - longest_stop)
        text += response.text
        completion_tokens = max(completion_tokens, response.generation_tokens)
        prompt_tokens = response.prompt_tokens or prompt_tokens
        if response.finish_reason is not None:
            finish_reason = "stop" if response.finish_reason == "stop" else "length"
        cut, _ = earliest_stop(text, stops, search_from)
        if cut >= 0:
            text = text[:cut]
            finish_reason = "stop"
            break
    elapsed_s = time.perf_counter() - start
    return Generation(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish_reason,
        inference_ms=round(elapsed_s * 1000, 3),
        tokens_per_s=round(completion_tokens / elapsed_s, 3) if elapsed_s > 0 else 0.0,
    )


def run(vlm: LoadedVLM, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a chat job: (OpenAI ``chat.completion``, metrics)."""
    job_input = job.input
    assert isinstance(job_input, ChatCompletionInput)
    if job_input.tools or job_input.json_mode() or job_input.logprobs:
        raise InvalidInput(
            f"model {vlm.spec.id!r} (kind vlm) takes no tools, response_format or logprobs",
            field="input",
        )
    gen = generate(vlm, job_input)
    result = completion_object(job, vlm.spec.id, gen, created=int(time.time()))
    return result, gen.metrics()
