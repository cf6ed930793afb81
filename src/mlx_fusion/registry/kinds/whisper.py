"""Speech to text through mlx-whisper: ``transcription`` jobs, OpenAI-shaped results.

Exports the names every kind module has (``JOB_KINDS``, ``load(spec)``, ``run(model, job)``),
plus ``prepare(job, settings)``, which runs in the worker process and turns a ``file_path`` into
inline data (so a model process never opens a path a job names), and ``unload(model)``, which
drops mlx-whisper's process-wide model cache.

``run`` decodes the audio with ffmpeg (16 kHz mono, like ``mlx_whisper.audio.load_audio``) from a
private temporary file, allowing only the file protocol and plain audio/video containers, so a
playlist or concat script cannot make ffmpeg read other files or URLs. Every result is a JSON
object: ``json`` and ``verbose_json`` as OpenAI returns them; ``text``, ``srt`` and ``vtt`` as
``{"text": <the formatted text>, "format": <the format>}``.

MLX and mlx-whisper are imported inside the functions, so importing this module (as the worker
does, for ``prepare``) does not initialise MLX.
"""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_fusion.config import Settings
from mlx_fusion.errors import InputPathNotAllowed, InvalidInput, ModelLoadError
from mlx_fusion.jobs.document import Job, Kind
from mlx_fusion.jobs.files import decode_base64, decode_data_url, read_input_file
from mlx_fusion.jobs.inputs.audio import TranscriptionInput
from mlx_fusion.registry.catalog import ModelSpec

JOB_KINDS = frozenset({Kind.TRANSCRIPTION})
"""The job kinds a whisper model runs."""

SAMPLE_RATE = 16_000
"""Whisper's input rate (Hz); audio is resampled to it, mono."""
FFMPEG_FORMATS = "wav,w64,mp3,flac,ogg,matroska,mov,aac,aiff,caf,amr,asf,au,mpeg"
"""The ffmpeg demuxers audio may use (mov covers mp4/m4a, matroska webm, ogg opus, asf wma)."""

_FIELD = "input.file"
_NO_LIMIT = 1 << 62  # in the model process: the worker already enforced the size limits
_FFMPEG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\] ")  # "[mp3 @ 0x55d0c1] "
_TRANSCRIBE_LOCK = threading.Lock()  # mlx-whisper's model cache is one per process


@dataclass(frozen=True)
class LoadedWhisper:
    """A loaded mlx-whisper model."""

    spec: ModelSpec
    model: Any
    path: str
    fp16: bool

    @property
    def multilingual(self) -> bool:
        """False for the English-only (``*.en``) models."""
        return bool(self.model.is_multilingual)


def load(spec: ModelSpec) -> LoadedWhisper:
    """Load the mlx-whisper directory named by the catalog entry (float16 on a GPU, float32 on
    the CPU backend, whatever the stored dtype)."""
    path = spec.model_dir
    if not path.is_dir():
        raise ModelLoadError(f"model {spec.id!r}: directory {path} does not exist")
    weights = [path / "weights.safetensors", path / "weights.npz"]
    if not any(w.is_file() for w in weights):
        hint = (
            " (it is a CTranslate2 model: convert it with mlx_fusion.ct2.convert_ct2_whisper)"
            if (path / "model.bin").is_file()
            else ""
        )
        raise ModelLoadError(
            f"model {spec.id!r}: {path} has no weights.safetensors or weights.npz{hint}"
        )
    if spec.quantize_bits is not None or spec.adapter_path is not None:
        raise ModelLoadError(
            f"model {spec.id!r}: quantize_bits and adapter_path are not supported for whisper"
        )
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_whisper.load_models import load_model

        fp16 = mx.default_device().type != mx.DeviceType.cpu
        dtype = mx.float16 if fp16 else mx.float32
        model: Any = load_model(str(path), dtype=dtype)
        stored = next(w for w in weights if w.is_file())
        params: Any = tree_flatten(model.parameters())
        saved: Any = mx.load(str(stored))
        # alignment_heads has a default (the later half of the decoder's heads)
        missing = {name for name, _ in params} - set(saved) - {"alignment_heads"}
        if missing:
            raise ModelLoadError(f"{stored} lacks {len(missing)} tensors, e.g. {min(missing)!r}")
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    except ModelLoadError as e:
        raise ModelLoadError(f"model {spec.id!r}: {e.message}") from e
    except Exception as e:
        raise ModelLoadError(f"model {spec.id!r}: {type(e).__name__}: {e}") from e
    return LoadedWhisper(spec=spec, model=model, path=str(path), fp16=fp16)


def unload(model: LoadedWhisper) -> None:
    """Forget ``model`` in mlx-whisper's process-wide cache (``ModelHolder``), so dropping the
    registry's reference frees it; only matters when models share a process (in-process mode)."""
    transcribe = sys.modules.get("mlx_whisper.transcribe")
    holder = getattr(transcribe, "ModelHolder", None)
    with _TRANSCRIBE_LOCK:
        if holder is not None and holder.model is model.model:
            holder.model = holder.model_path = None


# ----- the worker process ---------------------------------------------------------------------


def audio_bytes(job_input: TranscriptionInput, *, max_bytes: int) -> bytes:
    """The bytes of the inline ``file`` (base64 or a data: URL); ``InvalidInput`` /
    ``InputTooLarge``. A ``file_path`` is refused here: only ``prepare`` resolves it."""
    if job_input.file is None:
        raise InputPathNotAllowed(
            "file references are resolved by the worker; the model process reads no paths",
            field="input.file_path",
        )
    if job_input.file.startswith("data:"):
        _, data = decode_data_url(job_input.file, field=_FIELD, max_bytes=max_bytes)
    else:
        data = decode_base64(job_input.file, field=_FIELD, max_bytes=max_bytes)
    if not data:
        raise InvalidInput("the audio is empty", field=_FIELD)
    return data


def prepare(job: Job, settings: Settings) -> Job:
    """The job with its audio inline: a ``file_path`` is read from the input folder (after the
    folder rules of ``mlx_fusion.jobs.files``) and replaced by base64 ``file``; inline audio is
    checked (base64, size) and passed on as it is. Runs in the worker process."""
    job_input = job.input
    assert isinstance(job_input, TranscriptionInput)
    if job_input.file_path is None:
        audio_bytes(job_input, max_bytes=settings.max_file_bytes)
        return job
    data = read_input_file(
        job_input.file_path,
        settings.input_dir,
        field="input.file_path",
        max_bytes=settings.max_file_bytes,
    )
    if not data:
        raise InvalidInput("the audio file is empty", field="input.file_path")
    body = {k: v for k, v in job.spec.input.items() if k != "file_path"}
    body["file"] = base64.b64encode(data).decode("ascii")
    return Job(
        spec=job.spec.model_copy(update={"input": body}),
        kind=job.kind,
        input=TranscriptionInput.model_validate(body),
    )


# ----- the model process ----------------------------------------------------------------------


def decode_audio(data: bytes) -> Any:
    """16 kHz mono float32 samples (an ``mx.array``) of an audio file's bytes, through ffmpeg;
    ``InvalidInput`` (field ``input.file``) when ffmpeg cannot decode it."""
    import mlx.core as mx
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="mlx-fusion-audio-") as tmp:  # mode 0700
        source = Path(tmp) / "audio"
        source.write_bytes(data)
        cmd = [
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0",
            "-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS,
            "-i", str(source),
            "-vn", "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-",
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, check=False)
        except FileNotFoundError as e:
            raise RuntimeError("ffmpeg is not installed (it decodes audio for whisper)") from e
    if done.returncode != 0:
        raise InvalidInput(
            f"not a decodable audio file ({_ffmpeg_reason(done.stderr, str(source))})",
            field=_FIELD,
        )
    samples = np.frombuffer(done.stdout, dtype="<i2")
    if samples.size == 0:
        raise InvalidInput("the file contains no audio", field=_FIELD)
    return mx.array(samples).astype(mx.float32) / 32768.0


def _ffmpeg_reason(stderr: bytes, source: str) -> str:
    """ffmpeg's last two messages, without the temporary path or demuxer addresses."""
    text = stderr.decode("utf-8", "replace").replace(source, "input")
    lines = [_FFMPEG_CONTEXT.sub("", line).strip() for line in text.splitlines()]
    reason = "; ".join(line for line in lines[-2:] if line) or "ffmpeg failed"
    return reason[:200]


def _check_language(lm: LoadedWhisper, language: str | None) -> None:
    if language is None:
        return
    from mlx_whisper.tokenizer import LANGUAGES

    if language not in LANGUAGES:
        raise InvalidInput(f"unknown language code {language!r}", field="input.language")
    if not lm.multilingual and language != "en":
        raise InvalidInput(
            f"model {lm.spec.id!r} is English-only; language must be 'en' or absent",
            field="input.language",
        )


def _temperatures(temperature: float) -> tuple[float, ...]:
    """OpenAI's rule: 0 means start greedy and raise the temperature in steps of 0.2 while
    whisper's quality checks fail; any other value is used as it is."""
    if temperature == 0:
        return (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    return (temperature,)


def transcribe(lm: LoadedWhisper, samples: Any, job_input: TranscriptionInput) -> dict[str, Any]:
    """mlx-whisper's raw result (``text``, ``segments``, ``language``) for 16 kHz samples."""
    import mlx_whisper
    from mlx_whisper.transcribe import ModelHolder

    _check_language(lm, job_input.language)
    with _TRANSCRIBE_LOCK:
        # transcribe() looks its model up in this process-wide cache by path: make it ours
        ModelHolder.model, ModelHolder.model_path = lm.model, lm.path
        result: dict[str, Any] = mlx_whisper.transcribe(
            samples,
            path_or_hf_repo=lm.path,
            language=job_input.language,
            initial_prompt=job_input.prompt or None,
            temperature=_temperatures(job_input.temperature),
            fp16=lm.fp16,
            verbose=None,
        )
    return result


def _timestamp(seconds: float, marker: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{marker}{ms:03d}"


def subtitles(segments: list[dict[str, Any]], fmt: str) -> str:
    """SubRip (``srt``) or WebVTT (``vtt``) text of whisper segments."""
    marker = "," if fmt == "srt" else "."
    cues = []
    for number, seg in enumerate(segments, start=1):
        span = f"{_timestamp(seg['start'], marker)} --> {_timestamp(seg['end'], marker)}"
        text = str(seg["text"]).strip()
        cues.append(f"{number}\n{span}\n{text}\n" if fmt == "srt" else f"{span}\n{text}\n")
    body = "\n".join(cues)
    return body if fmt == "srt" else f"WEBVTT\n\n{body}"


def _segment(seg: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(seg["id"]),
        "seek": int(seg["seek"]),
        "start": float(seg["start"]),
        "end": float(seg["end"]),
        "text": str(seg["text"]),
        "tokens": [int(t) for t in seg["tokens"]],
        "temperature": float(seg["temperature"]),
        "avg_logprob": float(seg["avg_logprob"]),
        "compression_ratio": float(seg["compression_ratio"]),
        "no_speech_prob": float(seg["no_speech_prob"]),
    }


def transcription_object(
    raw: dict[str, Any], response_format: str, duration_s: float
) -> dict[str, Any]:
    """The job result for ``response_format`` from mlx-whisper's raw result."""
    text = str(raw["text"]).strip()
    segments: list[dict[str, Any]] = list(raw.get("segments") or [])
    usage = {"type": "duration", "seconds": math.ceil(duration_s)}
    if response_format == "json":
        return {"text": text, "usage": usage}
    if response_format == "text":
        return {"text": text, "format": "text"}
    if response_format in ("srt", "vtt"):
        return {"text": subtitles(segments, response_format), "format": response_format}
    from mlx_whisper.tokenizer import LANGUAGES

    code = str(raw.get("language") or "")
    return {
        "task": "transcribe",
        "language": LANGUAGES.get(code, code),
        "duration": round(duration_s, 3),
        "text": text,
        "segments": [_segment(seg) for seg in segments],
        "usage": usage,
    }


def run(lm: LoadedWhisper, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a transcription job: (result per ``response_format``, metrics)."""
    job_input = job.input
    assert isinstance(job_input, TranscriptionInput)
    started = time.perf_counter()
    samples = decode_audio(audio_bytes(job_input, max_bytes=_NO_LIMIT))
    decoded = time.perf_counter()
    raw = transcribe(lm, samples, job_input)
    inference_s = time.perf_counter() - decoded
    duration_s = samples.shape[0] / SAMPLE_RATE
    result = transcription_object(raw, job_input.response_format, duration_s)
    metrics = {
        "decode_ms": round((decoded - started) * 1000, 3),
        "inference_ms": round(inference_s * 1000, 3),
        "audio_s": round(duration_s, 3),
        "realtime_factor": round(inference_s / duration_s, 3),
    }
    return result, metrics
