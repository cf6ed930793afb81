"""bench/gpu_lm: language-model throughput through the worker against raw mlx-lm and Hugging Face
transformers on the same GPU, in the same run.

    python bench/gpu_lm.py [--shapes 1b,8b] [--batch 32] [--prompt-tokens 128] [--new-tokens 128]
                           [--repeats 3] [--skip-hf] [--skip-worker] [--out FILE]

For each shape, a Llama with random weights (``1b``: Llama-3.2-1B's shapes, ``8b``: Llama-3.1-8B's,
bf16; ``tiny``: 4 layers, 64 wide, float32, for the CPU and the tests) and a word-level tokenizer
of exactly ``vocab_size`` tokens, so every prompt is exactly ``--prompt-tokens`` tokens and every
generated id decodes. The EOS token's output row is zero, so greedy decoding never picks it; every
side checks that each sequence got exactly ``--new-tokens`` tokens and reports it. Prompts are
distinct random token sequences, the same on every side. Then:

- **raw_single**: ``mlx_lm.stream_generate``, one prompt at a time;
- **raw_batch**: ``mlx_lm``'s ``BatchGenerator`` with ``--batch`` sequences inserted at once:
  generated tokens / (insert -> last token), and each sequence's time to first token (the
  baseline of the target: ``BatchGenerator`` as mlx-lm ships it, prefilling 8 prompts a pass);
- **raw_batch_prefill_all**: the same with every prompt prefilled in one pass
  (``prefill_batch_size = --batch``), as the worker's batch engine does: a stricter baseline;
- **hf_single**, **hf_batch**: ``LlamaForCausalLM.generate`` (greedy,
  ``min_new_tokens = max_new_tokens``) at batch 1 and ``--batch``;
- **worker_single**, **worker_batch**: completion jobs submitted with
  ``mlx_fusion.client.Client.submit_many`` to a real ``mlx-fusion worker`` (its own
  redis-server; the embedded job store, or with ``--store mongomock`` a worker in this process)
  whose catalog has the model: one job at a time, then ``--batch`` jobs at once. tok/s =
  completion tokens / (submit -> last job finished); per job, time to first token when the
  worker's metrics carry it.

Every single and batch figure is the median of ``--repeats`` runs, each with its own prompts
(every run's tok/s is kept beside it). Raw mlx-lm and the worker run side by side: raw mlx-lm
stays loaded in a child process of this script while the worker has the model too, and each
prompt or batch goes to one, then the other. On an H200 the speed of the same batch run drifted
by a third within a minute (faster as the process warmed), so runs far apart in time do not
compare. Each side first warms up with one full single run and one full batch (raw mlx-lm: one
of each prefill size). Transformers runs before them, in a child process of its own, alone on
the GPU (one full single run and a batch of 8-token runs to warm up). Prints one JSON object:
each side's figures, the ratios, the targets (worker single >= 0.95x raw single, worker batch
>= 0.85x raw ``BatchGenerator``) and the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO / "src"))  # mlx_fusion where it is not installed (the device machine)

LLAMA_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
    "1b": {  # Llama-3.2-1B
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "8b": {  # Llama-3.1-8B
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
DTYPES = {"tiny": "float32"}
"""MLX's CPU backend is far slower in half precision; every other shape is bfloat16."""
TARGET_SINGLE = 0.95
TARGET_BATCH = 0.85
WARMUP_TOKENS = 8
RESULT_PREFIX = "GPU_LM_RESULT "
POLL_S = 0.02
RQ_ENDED = frozenset({b"finished", b"failed", b"stopped", b"canceled"})
"""RQ job statuses after which the job's record is final."""
TTFT_METRICS = ("time_to_first_token_ms", "ttft_ms", "first_token_ms")
"""Names under which a worker's job metrics may carry the time to first token."""


# -- the model, its tokenizer and the prompts ---------------------------------------------------


def dtype_of(shape: str) -> str:
    return DTYPES.get(shape, "bfloat16")


def llama_config(shape: str) -> dict[str, Any]:
    return {**LLAMA_COMMON, **SHAPES[shape]}


def eos_id(shape: str) -> int:
    """The last id: its output row is zeroed, so greedy decoding of random weights skips it."""
    return int(SHAPES[shape]["vocab_size"]) - 1


def word(token: int) -> str:
    return f" w{token}"


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` tokens: id i is the text " w<i>" (byte-level
    form "Ġw<i>", so mlx-lm picks its incremental BPE detokenizer), the last id is ``<eos>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"\u0120w{i}": i for i in range(vocab_size - 1)}
    vocab["<eos>"] = vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="\u0120w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<eos>", special=True)])
    assert tokenizer.get_vocab_size() == vocab_size
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<eos>",
        "unk_token": "<eos>",
        "pad_token": "<eos>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_model(shape: str, out_dir: Path) -> dict[str, Any]:
    """Write a random-weight mlx-lm model directory for ``shape``; its description."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out_dir.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    build_tokenizer(out_dir, int(config["vocab_size"]))
    began = time.perf_counter()
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype_of(shape)))
    weights = dict(tree_flatten(model.parameters()))
    for value in weights.values():
        mx.eval(value)  # one at a time: the float32 initial values never all exist at once
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    weights[head][eos_id(shape)] = 0
    mx.eval(weights[head])
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    full = {**config, "architectures": ["LlamaForCausalLM"], "eos_token_id": eos_id(shape)}
    (out_dir / "config.json").write_text(json.dumps(full, indent=2), encoding="utf-8")
    return {
        "parameters": sum(int(v.size) for v in weights.values()),
        "dtype": dtype_of(shape),
        "build_s": round(time.perf_counter() - began, 2),
    }


def prompt_pool(shape: str, args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """Distinct random prompts, the same on every side: ``warm`` and ``single`` (one per
    repeat) for the single runs, ``warm_batch`` and ``batches`` (one batch per repeat) for the
    batches."""
    rng = random.Random(1234)
    top = eos_id(shape) - 1

    def draw(n: int) -> list[list[int]]:
        return [[rng.randint(0, top) for _ in range(args.prompt_tokens)] for _ in range(n)]

    return {
        "warm": draw(1),
        "single": draw(args.repeats),
        "warm_batch": draw(args.batch),
        "batches": [draw(args.batch) for _ in range(args.repeats)],
    }


def prompt_text(tokens: list[int]) -> str:
    return "".join(word(t) for t in tokens)


# -- small helpers ------------------------------------------------------------------------------


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """a's tok/s over b's, from the figures as reported."""
    x = (a or {}).get("tokens_per_s")
    y = (b or {}).get("tokens_per_s")
    return round(x / y, 3) if x and y else None


def spread_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50_ms": None, "max_ms": None}
    return {
        "p50_ms": round(statistics.median(values_s) * 1000, 1),
        "max_ms": round(max(values_s) * 1000, 1),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tok/s, with every run's tok/s."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


# -- raw mlx-lm (child process) -----------------------------------------------------------------


def mlx_serve(shape: str, model_dir: Path) -> None:
    """Load the model, then run what each stdin line asks (JSON: ``single`` or ``batch``) and
    print each result as a ``RESULT_PREFIX`` line, until ``quit`` or the end of stdin."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = mlx_lm.load(str(model_dir))[:2]
    eos = eos_id(shape)
    probe = [eos - 1, 0, 5]
    if list(tokenizer.encode(prompt_text(probe))) != probe:
        raise RuntimeError("the prompt text does not tokenize to its tokens")

    def single(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        began = time.perf_counter()
        first = None
        last: Any = None
        for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            first = first if first is not None else time.perf_counter()
            last = response
        wall = time.perf_counter() - began
        tokens = last.generation_tokens if last is not None else 0
        return {
            "tokens": tokens,
            "wall_s": round(wall, 4),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft": spread_ms([(first or began) - began]),
            "decode_tokens_per_s": round(last.generation_tps, 1) if last is not None else None,
            "full_length": tokens == max_tokens,
        }

    def batch(
        prompts: list[list[int]], max_tokens: int, prefill: int | None = None
    ) -> dict[str, Any]:
        gen = BatchGenerator(
            model,
            max_tokens=max_tokens,
            stop_tokens=[[eos]],
            completion_batch_size=len(prompts),
            **({"prefill_batch_size": prefill} if prefill else {}),
        )
        began = time.perf_counter()
        uids = gen.insert(prompts, [max_tokens] * len(prompts))
        first: dict[int, float] = {}
        counts = dict.fromkeys(uids, 0)
        eos_hits = 0
        last = began
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                first.setdefault(r.uid, now)
                if r.finish_reason == "stop":
                    eos_hits += 1
                else:
                    counts[r.uid] += 1
            last = now
        gen.close()
        wall = last - began
        total = sum(counts.values())
        return {
            "sequences": len(prompts),
            "tokens": total,
            "wall_s": round(wall, 4),
            "tokens_per_s": round(total / wall, 1),
            "ttft": spread_ms([t - began for t in first.values()]),
            "full_length": all(c == max_tokens for c in counts.values()) and eos_hits == 0,
            "prefill_batch_size": gen.prefill_batch_size,
            "completion_batch_size": gen.completion_batch_size,
        }

    def info() -> dict[str, Any]:
        plain = (int, float, str)
        device = {
            str(k): v if isinstance(v, plain) else str(v) for k, v in mx.device_info().items()
        }
        return {
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "device": str(mx.default_device()),
            "device_info": device,
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 2),
        }

    print(RESULT_PREFIX + json.dumps({"loaded": True}), flush=True)
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "single":
            result = single(op["prompt"], op["max_tokens"])
        elif op["op"] == "batch":
            result = batch(op["prompts"], op["max_tokens"], op.get("prefill"))
        elif op["op"] == "info":
            result = info()
        else:
            return
        print(RESULT_PREFIX + json.dumps(result), flush=True)


class RawMLX:
    """Raw mlx-lm in a child process of this script (``mlx_serve``), loaded once and driven one
    run at a time, so its runs interleave with the worker's: a GPU's speed drifted by a third
    within a minute on the same process, which runs side by side in time cancel out."""

    def __init__(self, shape: str, work_dir: Path, args: argparse.Namespace) -> None:
        command = [*child_command("mlx", shape, work_dir, args)]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        # a child that hangs is killed: every read below then ends
        self._watchdog = threading.Timer(args.child_timeout_s, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
                return result
        raise RuntimeError(f"the raw mlx-lm child exited ({self.proc.wait()})")

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def single(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        return self.call("single", prompt=prompt, max_tokens=max_tokens)

    def batch(
        self, prompts: list[list[int]], max_tokens: int, prefill: int | None = None
    ) -> dict[str, Any]:
        return self.call("batch", prompts=prompts, max_tokens=max_tokens, prefill=prefill)

    def close(self) -> None:
        self._watchdog.cancel()
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
        except OSError:
            pass
        stop_process(self.proc, 30)


def interleaved(
    shape: str,
    raw: RawMLX,
    worker: Callable[[list[list[int]], int, float], dict[str, Any]] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every raw and worker run, side by side in time: each single prompt and each batch goes to
    raw mlx-lm and then to the worker (``worker(prompts, max_tokens, timeout_s)``, when there
    is one); full-length warm-up runs first, on each side."""
    pool = prompt_pool(shape, args)
    tokens = args.new_tokens
    raw.single(pool["warm"][0], tokens)
    raw.batch(pool["warm_batch"], tokens)
    raw.batch(pool["warm_batch"], tokens, prefill=args.batch)
    if worker is not None:
        worker(pool["warm"], tokens, args.job_timeout_s + 600)  # loads the model
        worker(pool["warm_batch"], tokens, args.job_timeout_s)
    runs: dict[str, list[dict[str, Any]]] = {}
    for prompt in pool["single"]:
        runs.setdefault("raw_single", []).append(raw.single(prompt, tokens))
        if worker is not None:
            runs.setdefault("worker_single", []).append(
                worker([prompt], tokens, args.job_timeout_s)
            )
    for prompts in pool["batches"]:
        runs.setdefault("raw_batch", []).append(raw.batch(prompts, tokens))
        runs.setdefault("raw_batch_prefill_all", []).append(
            raw.batch(prompts, tokens, prefill=args.batch)
        )
        if worker is not None:
            runs.setdefault("worker_batch", []).append(worker(prompts, tokens, args.job_timeout_s))
    what = {
        "raw_single": "mlx_lm.stream_generate, one prompt",
        "raw_batch": "mlx_lm BatchGenerator, all prompts inserted at once",
        "raw_batch_prefill_all": "the same with prefill_batch_size = --batch (one prefill pass)",
        "worker_single": "Client.submit_many -> mlx-fusion worker, one job",
        "worker_batch": f"Client.submit_many -> mlx-fusion worker, {args.batch} jobs at once",
    }
    sides = {name: {"what": what[name], **median_run(r)} for name, r in runs.items()}
    sides["mlx"] = raw.call("info")
    return sides


# -- Hugging Face transformers (child process) ---------------------------------------------------


def hf_side(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_of(shape))
    eos = eos_id(shape)
    config = {k: v for k, v in llama_config(shape).items() if k != "model_type"}
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # the weights are made in bf16 on the GPU, never in float32
    with torch.device(device):
        model = LlamaForCausalLM(
            LlamaConfig(**config, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
        )
    torch.set_default_dtype(torch.float32)  # what generate() makes for itself, as usual
    model.eval()
    pool = prompt_pool(shape, args)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def generate(prompts: list[list[int]], max_new: int) -> dict[str, Any]:
        ids = torch.tensor(prompts, device=device)
        sync()
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=eos,
                eos_token_id=eos,
            )
        sync()
        wall = time.perf_counter() - began
        new = out[:, ids.shape[1] :]
        total = int(new.numel())
        return {
            "sequences": len(prompts),
            "tokens": total,
            "wall_s": round(wall, 4),
            "tokens_per_s": round(total / wall, 1),
            "full_length": new.shape[1] == max_new and not bool((new == eos).any()),
        }

    generate(pool["warm"], args.new_tokens)
    singles = [generate([p], args.new_tokens) for p in pool["single"]]
    generate(pool["warm_batch"], WARMUP_TOKENS)
    batched = median_run([generate(b, args.new_tokens) for b in pool["batches"]])
    return {
        "hf_single": {"what": "transformers generate, batch 1", **median_run(singles)},
        "hf_batch": {"what": f"transformers generate, batch {args.batch}", **batched},
        "torch": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "attn_implementation": model.config._attn_implementation,
        },
    }


# -- through the worker (this process and a worker process) -------------------------------------


def lm_kind_batches() -> bool:
    """Whether the lm kind has a batch engine (several jobs of a model run as one batch)."""
    from mlx_fusion.registry.kinds import lm

    return hasattr(lm, "BatchEngine")


def write_catalog(path: Path, model_id: str, model_dir: Path, args: argparse.Namespace) -> None:
    from mlx_fusion.registry.catalog import ModelSpec

    lines = [
        f"[models.{model_id}]",
        'kind = "lm"',
        f"path = {json.dumps(str(model_dir))}",
        "keep_alive_s = -1",
        f"max_concurrent_jobs = {args.batch}",
        f"default_max_tokens = {args.new_tokens}",
    ]
    if "max_batch_size" in ModelSpec.model_fields:
        lines.append(f"max_batch_size = {args.batch}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def ttft_s(metrics: dict[str, Any]) -> float | None:
    for key in TTFT_METRICS:
        if metrics.get(key) is not None:
            return float(metrics[key]) / 1000
    return None


def job_figures(records: list[dict[str, Any]], submitted: list[float]) -> dict[str, Any]:
    """tok/s of jobs submitted at ``submitted`` (epoch seconds) from their final records."""
    from mlx_fusion.jobs.store import as_utc

    statuses = [r.get("status") for r in records]
    if any(s != "completed" for s in statuses):
        errors = [r.get("error") for r in records if r.get("status") != "completed"]
        raise RuntimeError(f"jobs ended {statuses}: {errors[:3]}")
    finished = [as_utc(r["finished_at"]).timestamp() for r in records]
    tokens = [int(r["metrics"]["completion_tokens"]) for r in records]
    prompt_tokens = {int(r["metrics"]["prompt_tokens"]) for r in records}
    wall = max(finished) - min(submitted)
    ttft = [t for r in records if (t := ttft_s(r["metrics"])) is not None]
    return {
        "jobs": len(records),
        "tokens": sum(tokens),
        "wall_s": round(wall, 4),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "latency": spread_ms([f - s for f, s in zip(finished, submitted, strict=True)]),
        "queue_wait": spread_ms([r["metrics"].get("queue_wait_ms", 0) / 1000 for r in records]),
        "ttft": spread_ms(ttft) if ttft else None,
        "prompt_tokens": sorted(prompt_tokens),
        "completion_tokens": sorted(set(tokens)),
    }


def submit_completions(
    client: Any, model_id: str, prompts: list[list[int]], max_tokens: int
) -> tuple[list[float], list[str]]:
    """Submit one greedy completion job per prompt, all in one ``Client.submit_many`` (a
    Tier-2 fan-out): (submit times, job ids)."""
    documents = [
        {
            "kind": "completion",
            "model": model_id,
            "input": {"prompt": prompt_text(prompt), "max_tokens": max_tokens, "temperature": 0},
        }
        for prompt in prompts
    ]
    began = time.time()
    ids = client.submit_many(documents)
    return [began] * len(ids), ids


def worker_env(
    url: str, store: str, data_dir: Path, catalog: Path, mongo_db: str = "mlx_fusion"
) -> dict[str, str]:
    """The environment of a worker process: this one's, less its FUSION_ settings, plus ours
    (``mongo_db``: the database the benchmark reads the records from)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_")}
    env.update(
        FUSION_REDIS_URL=url,
        FUSION_MONGO_DB=mongo_db,
        FUSION_DATA_DIR=str(data_dir),
        FUSION_CATALOG_PATH=str(catalog),
        FUSION_KEEP_ALIVE_S="-1",
        FUSION_LOG_LEVEL="WARNING",
        FUSION_LOG_FORMAT="json",
        FUSION_JOB_MAX_ATTEMPTS="1",  # a job the worker loses fails at once, never runs twice
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    if store != "embedded":
        env["FUSION_MONGO_URL"] = store
    return env


def worker_side(
    shape: str, model_dir: Path, work_dir: Path, args: argparse.Namespace, raw: RawMLX
) -> dict[str, Any]:
    """The raw and worker figures, measured side by side (``interleaved``). The worker: a
    ``mlx-fusion worker`` process (embedded job store or ``--store mongodb://...``), or for
    ``--store mongomock`` a ``FusionWorker`` in this process's main thread (mongomock is one
    process's) while another thread submits."""
    from overhead import start_redis
    from redis import Redis

    from mlx_fusion.client import Client
    from mlx_fusion.config import Settings
    from mlx_fusion.jobs.backends import connect_store

    model_id = f"bench-{shape}"
    catalog = work_dir / f"models-{shape}.toml"
    write_catalog(catalog, model_id, model_dir, args)
    data_dir = work_dir / f"data-{shape}"
    log_path = work_dir / f"worker-{shape}.log"
    in_process = args.store == "mongomock"
    sides: dict[str, Any] = {
        "worker": {
            "process": "in this process (mongomock)" if in_process else "mlx-fusion worker",
            "store": args.store,
            "lm_kind_batches": lm_kind_batches(),
            "catalog": catalog.read_text(),
        }
    }
    worker: subprocess.Popen[bytes] | None = None
    redis_proc, url = start_redis(work_dir)
    try:
        settings = Settings(
            redis_url=url,
            mongo_url={"embedded": None, "mongomock": "mongomock://"}.get(args.store, args.store),
            mongo_db=f"bench_gpu_lm_{os.getpid()}",
            data_dir=data_dir,
            catalog_path=catalog,
            keep_alive_s=-1,
            job_max_attempts=1,
            log_level="WARNING",
            _env_file=None,  # type: ignore[call-arg]
        )
        store = connect_store(settings)
        redis = Redis.from_url(url)
        client = Client(settings, redis, store)

        def run(prompts: list[list[int]], max_tokens: int, timeout_s: float) -> dict[str, Any]:
            submitted, ids = submit_completions(client, model_id, prompts, max_tokens)
            pending, deadline = set(ids), time.monotonic() + timeout_s
            while pending:
                # RQ's status in Redis turns finished or failed after the job's final store
                # write: polling it costs the worker nothing (the store may be in its process)
                with redis.pipeline(transaction=False) as pipe:
                    for job_id in sorted(pending):
                        pipe.hget(f"rq:job:{job_id}", "status")
                    for job_id, status in zip(sorted(pending), pipe.execute(), strict=True):
                        if status in RQ_ENDED:
                            pending.discard(job_id)
                if worker is not None and worker.poll() is not None:
                    raise RuntimeError(f"the worker exited ({worker.returncode}); see its log")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} of {len(ids)} jobs unfinished")
                time.sleep(POLL_S)
            records = [client.get(i) or {} for i in ids]
            figures = job_figures(records, submitted)
            figures["full_length"] = figures["completion_tokens"] == [max_tokens]
            return figures

        def stages() -> None:
            sides.update(interleaved(shape, raw, run, args))

        if in_process:
            run_in_process(settings, store, Redis.from_url(url), catalog, stages)
        else:
            with log_path.open("wb") as log:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "mlx_fusion", "worker"],
                    env=worker_env(url, args.store, data_dir, catalog, settings.mongo_db),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=work_dir,
                )
                try:
                    stages()
                finally:
                    stop_process(worker, 60)
    except Exception as e:
        if log_path.exists():
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            print(f"worker log ({log_path}), its end:\n{tail}", file=sys.stderr)
        sides["worker_error"] = f"{type(e).__name__}: {e}"
    finally:
        # also on errors: a redis-server left running keeps this script's output pipe open
        stop_process(redis_proc, 10)
        if args.log_dir and log_path.exists():
            shutil.copy(log_path, Path(args.log_dir) / log_path.name)
    return sides


def run_in_process(
    settings: Any, store: Any, redis: Any, catalog: Path, stages: Callable[[], None]
) -> None:
    """``stages()`` in a thread while a ``FusionWorker`` runs in this (main) thread; SIGTERM to
    this process (RQ's warm shutdown) ends the worker when the stages are done."""
    from mlx_fusion import logs
    from mlx_fusion.registry import Catalog, ModelRegistry
    from mlx_fusion.runner import JobRunner
    from mlx_fusion.worker import FusionWorker

    logs.configure("console", "WARNING")
    registry = ModelRegistry(Catalog.load(catalog), settings)
    worker = FusionWorker(
        settings=settings, connection=redis, runner=JobRunner(settings, store, registry)
    )
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            stages()
        except BaseException as e:  # raised here after the worker stops
            errors.append(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    producer = threading.Thread(target=produce, name="bench-producer", daemon=True)
    producer.start()
    worker.work(logging_level="WARNING")
    producer.join(timeout=60)
    if errors:
        raise errors[0]


def stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- orchestration ------------------------------------------------------------------------------


def child_command(part: str, shape: str, work_dir: Path, args: argparse.Namespace) -> list[str]:
    """The command line of this script running ``part`` of ``shape`` as a child."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        part,
        "--shapes",
        shape,
        "--work-dir",
        str(work_dir),
        "--batch",
        str(args.batch),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]


def child(part: str, shape: str, work_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``part`` of ``shape`` in a child process of this script; its result."""
    done = subprocess.run(
        child_command(part, shape, work_dir, args),
        stdout=subprocess.PIPE,
        text=True,
        timeout=args.child_timeout_s,
        check=False,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    raise RuntimeError(f"{part} {shape}: the child exited {done.returncode} with no result")


def run_child(args: argparse.Namespace) -> None:
    shape = args.shapes
    model_dir = Path(args.work_dir) / shape
    if args.child == "build":
        result = build_model(shape, model_dir)
    elif args.child == "mlx":
        mlx_serve(shape, model_dir)
        return
    else:
        result = hf_side(shape, args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def guarded(
    name: str, errors: dict[str, str], work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """``work()``, or {} with the error kept under ``name``: one failing side leaves the others."""
    try:
        return work()
    except Exception as e:
        traceback.print_exc()
        errors[name] = f"{type(e).__name__}: {e}"
        return {}


def mlx_and_worker(shape: str, work_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Raw mlx-lm's figures and, unless ``--skip-worker``, the worker's, run side by side."""
    raw = RawMLX(shape, work_dir, args)
    try:
        if args.skip_worker:
            return interleaved(shape, raw, None, args)
        return worker_side(shape, work_dir / shape, work_dir, args, raw)
    finally:
        raw.close()


def bench_shape(shape: str, work_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    errors: dict[str, str] = {}
    print(f"[gpu_lm] {shape}: building", file=sys.stderr, flush=True)
    built = child("build", shape, work_dir, args)
    sides: dict[str, Any] = {}
    if not args.skip_hf:  # first, alone on the GPU
        print(f"[gpu_lm] {shape}: transformers", file=sys.stderr, flush=True)
        sides.update(guarded("hf", errors, lambda: child("hf", shape, work_dir, args)))
    what = "raw mlx-lm" + ("" if args.skip_worker else " and the worker, side by side")
    print(f"[gpu_lm] {shape}: {what}", file=sys.stderr, flush=True)
    sides.update(guarded("mlx", errors, lambda: mlx_and_worker(shape, work_dir, args)))
    if "worker_error" in sides:  # what it measured before the error stays
        errors["worker"] = sides.pop("worker_error")
    shutil.rmtree(work_dir / shape, ignore_errors=True)  # an 8B model is 16 GB of disk
    ratios = {
        "worker_single_vs_raw_single": ratio(sides.get("worker_single"), sides.get("raw_single")),
        "worker_batch_vs_raw_batch": ratio(sides.get("worker_batch"), sides.get("raw_batch")),
        "worker_batch_vs_raw_batch_prefill_all": ratio(
            sides.get("worker_batch"), sides.get("raw_batch_prefill_all")
        ),
        "worker_batch_vs_hf_batch": ratio(sides.get("worker_batch"), sides.get("hf_batch")),
        "worker_single_vs_hf_single": ratio(sides.get("worker_single"), sides.get("hf_single")),
        "raw_batch_vs_hf_batch": ratio(sides.get("raw_batch"), sides.get("hf_batch")),
        "raw_single_vs_hf_single": ratio(sides.get("raw_single"), sides.get("hf_single")),
    }
    measured = [v for k, v in sides.items() if isinstance(v, dict) and "full_length" in v]
    single, batch = ratios["worker_single_vs_raw_single"], ratios["worker_batch_vs_raw_batch"]
    return {
        "model": {**llama_config(shape), **built},
        **sides,
        "ratios": ratios,
        "meets_targets": {
            "worker_single": None if single is None else single >= TARGET_SINGLE,
            "worker_batch": None if batch is None else batch >= TARGET_BATCH,
        },
        "every_sequence_full_length": all(m["full_length"] for m in measured),
        "errors": errors,
    }


def nvidia_smi() -> list[dict[str, str]]:
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = ("name", "driver", "memory")
    rows = [[p.strip() for p in line.split(",")] for line in out.strip().splitlines()]
    return [dict(zip(keys, row, strict=False)) for row in rows]


def machine(shapes: dict[str, Any]) -> dict[str, Any]:
    from overhead import machine as host

    gpus = nvidia_smi()
    found = next((s for s in shapes.values() if "mlx" in s), {})
    mlx_info = found.get("mlx", {})
    torch_info = next((s["torch"] for s in shapes.values() if "torch" in s), None)
    name = gpus[0]["name"] if gpus else mlx_info.get("device_info", {}).get("device_name")
    return {
        **host(),
        "gpu": name or "none",
        "gpus": gpus,
        "mlx": mlx_info,
        "torch": torch_info,
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "gpu_lm",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "batch": args.batch,
            "repeats": args.repeats,
            "sampling": "greedy (temperature 0)",
            "warmup": "one full single run and one full batch per side "
            f"(transformers: a batch of {WARMUP_TOKENS}-token runs)",
            "order": "raw mlx-lm and worker runs interleaved, run by run",
        },
        "shapes": results,
        "targets": {
            "worker_single_vs_raw_single_at_least": TARGET_SINGLE,
            "worker_batch_vs_raw_batch_at_least": TARGET_BATCH,
        },
        "machine": machine(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1b,8b", help="comma separated: tiny, 1b, 8b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (single and batch)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-worker", action="store_true")
    parser.add_argument("--job-timeout-s", type=float, default=300)
    parser.add_argument("--child-timeout-s", type=float, default=1200)
    parser.add_argument("--work-dir", help="where models are built (default: a temporary dir)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--log-dir", help="keep the worker's logs here")
    parser.add_argument(
        "--store",
        default="embedded",
        help="the worker's job store: embedded (montydb, the default with no MongoDB), a "
        "mongodb:// URL, or mongomock (then the worker runs in this process)",
    )
    parser.add_argument("--child", choices=("build", "mlx", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-lm-", dir=args.work_dir) as tmp:
        for shape in shapes:
            results[shape] = bench_shape(shape, Path(tmp), args)
            text = json.dumps(report(results, args), indent=2)
            if args.out:  # after each shape: a run stopped later keeps what it measured
                Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    if any(r["errors"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
