"""Chat jobs with images end to end on a tiny random-weight llava: Redis -> worker -> model
process -> store. Every job of this file goes through one worker run (one model load); each test
then checks the record of its own jobs. Each bad job is followed by a good one, which must still
complete."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assert_failed_then_next_completed,
    build_worker,
    completed,
    make_store,
    worker_settings,
    write_catalog,
)
from redis import Redis
from tiny_models import build_tiny_llama
from tiny_vlm import build_tiny_llava

from mlx_fusion.client import Client
from mlx_fusion.config import Settings

VLM = "tiny-vlm"
LM = "tiny-lm"


def png_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_chat(url: str, **extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


GOOD = {"max_tokens": 3}
BAD_JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    "outside": (VLM, image_chat("file:../outside.png", **GOOD)),
    "remote": (VLM, image_chat("https://example.com/cat.png", **GOOD)),
    "undecodable": (VLM, image_chat(data_url(b"\x89PNG\r\n\x1a\nnot really a png"), **GOOD)),
    "not-an-image": (VLM, image_chat(data_url(b"GIF89a...", "image/gif"), **GOOD)),
    "lm-image": (LM, image_chat(data_url(png_bytes()), **GOOD)),
}


def chat_job(job_id: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "kind": "chat.completion", "model": model, "input": body}


@pytest.fixture(scope="module")
def records(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every job of this file run by one worker; the final records by job id."""
    tmp = tmp_path_factory.mktemp("vision")
    vlm_dir = build_tiny_llava(tmp / VLM)
    lm_dir = build_tiny_llama(tmp / LM)
    input_dir = tmp / "inputs"
    (input_dir / "sub").mkdir(parents=True)
    (input_dir / "sub" / "red.png").write_bytes(png_bytes((20, 50)))
    (tmp / "outside.png").write_bytes(png_bytes())
    catalog = write_catalog(
        tmp / "models.toml",
        {VLM: {"kind": "vlm", "path": vlm_dir}, LM: {"kind": "lm", "path": lm_dir}},
    )
    settings = worker_settings(redis_url, tmp / "data", catalog, input_dir=input_dir)
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    store = make_store("mongomock", tmp)
    client = Client(settings, redis, store)
    url = data_url(png_bytes())
    client.submit(chat_job("image", VLM, image_chat(url, max_tokens=8)))
    client.submit(chat_job("length", VLM, image_chat(url, max_tokens=3)))
    client.submit(chat_job("stop", VLM, image_chat(url, max_tokens=3, stop=["3"])))
    client.submit(chat_job("file", VLM, image_chat("file:sub/red.png", **GOOD)))
    for name, (model, body) in BAD_JOBS.items():
        client.submit(chat_job(name, model, body))
        client.submit(chat_job(f"{name}-next", VLM, image_chat(url, **GOOD)))
    worker = build_worker(settings, redis, store)
    worker.work(burst=True)
    names = ["image", "length", "stop", "file", *BAD_JOBS, *(f"{n}-next" for n in BAD_JOBS)]
    yield {name: client.get(name) for name in names}
    redis.flushdb()


def test_chat_job_with_an_image_returns_a_chat_completion_with_usage(
    records: dict[str, Any],
) -> None:
    result = completed(records, "image")
    assert result["object"] == "chat.completion" and result["model"] == VLM
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    # 32 px image, patch 8: 16 image tokens replace the one <image> token
    assert usage["prompt_tokens"] > 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    metrics = records["image"]["metrics"]
    assert metrics["prompt_tokens"] == usage["prompt_tokens"] and metrics["inference_ms"] > 0


def test_max_tokens_ends_with_length_and_that_many_tokens(records: dict[str, Any]) -> None:
    result = completed(records, "length")
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 3


def test_stop_sequence_cuts_the_text_and_ends_with_stop(records: dict[str, Any]) -> None:
    full = completed(records, "length")["choices"][0]["message"]["content"]
    assert "3" in full, full  # greedy output of the tiny model with seed 0 weights
    choice = completed(records, "stop")["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == full[: full.index("3")]


def test_image_file_under_the_input_folder_is_read(records: dict[str, Any]) -> None:
    assert completed(records, "file")["usage"]["completion_tokens"] >= 1


def test_image_file_outside_the_input_folder_is_refused(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "outside", "input_path_not_allowed", "input.messages.0.content.1.image_url.url"
    )
    assert "outside the input folder" in message


def test_remote_image_url_is_refused(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "remote", "invalid_input", "input.messages.0.content.1.image_url.url"
    )
    assert "remote images are not fetched" in message


def test_undecodable_image_is_refused(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "undecodable", "invalid_input", "input.messages.0.content.1.image_url.url"
    )
    assert "does not decode" in message


def test_image_of_another_format_is_refused(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "not-an-image", "invalid_input", "input.messages.0.content.1.image_url.url"
    )
    assert "PNG, JPEG or WebP" in message


def test_image_sent_to_a_text_only_model_is_refused(records: dict[str, Any]) -> None:
    message = assert_failed_then_next_completed(
        records, "lm-image", "invalid_input", "input.messages.0.content.1"
    )
    assert "text-only" in message


def test_prepare_leaves_a_text_only_job_unchanged(tmp_path: Path) -> None:
    from mlx_fusion.jobs.document import parse_job
    from mlx_fusion.registry.kinds import vlm

    job = parse_job(
        chat_job("t", VLM, {"messages": [{"role": "user", "content": "Hi"}]}),
        max_input_bytes=100_000,
    )
    settings = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    assert vlm.prepare(job, settings) is job
