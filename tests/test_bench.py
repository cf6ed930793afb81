"""The benchmarks run and print what they promise (their figures are not checked here: speed
targets live in the benchmarks' own output, not in timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from conftest import REPO


def run_bench(script: str, *args: str) -> dict[str, Any]:
    """Run ``bench/SCRIPT ARGS`` (no FUSION_ settings of this environment) and parse its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_")}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_overhead_benchmark_prints_both_sides_and_their_ratio() -> None:
    report = run_bench("overhead.py", "--jobs", "8", "--warmup", "2")
    for side in ("baseline", "fusion"):
        figures = report[side]
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert figures["queued_jobs_per_s"] > 0
    assert report["ratio_p50"] == round(
        report["fusion"]["p50_ms"] / report["baseline"]["p50_ms"], 3
    )
    assert report["p50_overhead_ms"] == round(
        report["fusion"]["p50_ms"] - report["baseline"]["p50_ms"], 3
    )
    assert report["machine"]["cpus"] == os.cpu_count()


def test_thrash_benchmark_compares_fifo_with_model_aware_order() -> None:
    report = run_bench("thrash.py", "--models", "2", "--jobs", "4")
    # seed 7 queues model-1, model-0, model-1, model-0: FIFO loads at every switch
    assert report["fifo"]["model_loads"] == 4
    assert report["model_aware"]["model_loads"] == 2
    assert report["ratio_model_loads"] == 0.5
    assert report["model_aware"]["makespan_s"] > 0 and report["fifo"]["max_wait_s"] > 0


def test_gpu_lm_benchmark_compares_the_worker_with_raw_mlx_lm() -> None:
    report = run_bench(
        "gpu_lm.py",
        *("--shapes", "tiny", "--skip-hf", "--batch", "3", "--repeats", "1"),
        *("--prompt-tokens", "16", "--new-tokens", "16"),
        # the worker in this process: the embedded store (montydb) cannot take the batching
        # worker's threads yet, so its own process would lose jobs
        *("--store", "mongomock"),
    )
    shape = report["shapes"]["tiny"]
    assert shape["errors"] == {}
    for side in ("raw_single", "raw_batch", "worker_single", "worker_batch"):
        assert shape[side]["tokens_per_s"] > 0 and shape[side]["full_length"], side
        assert shape[side]["ttft"] is None or shape[side]["ttft"]["p50_ms"] >= 0
    assert shape["raw_batch"]["tokens"] == shape["worker_batch"]["tokens"] == 3 * 16
    assert shape["worker_batch"]["prompt_tokens"] == [16]
    assert shape["worker_batch"]["completion_tokens"] == [16]
    assert shape["every_sequence_full_length"] is True

    def tps(side: str) -> float:
        return float(shape[side]["tokens_per_s"])

    ratios = shape["ratios"]
    single = ratios["worker_single_vs_raw_single"]
    assert single == round(tps("worker_single") / tps("raw_single"), 3)
    assert ratios["worker_batch_vs_raw_batch"] == round(tps("worker_batch") / tps("raw_batch"), 3)
    assert ratios["worker_batch_vs_hf_batch"] is None  # --skip-hf
    assert shape["meets_targets"]["worker_single"] == (single >= 0.95)
    assert report["targets"]["worker_batch_vs_raw_batch_at_least"] == 0.85
    assert report["machine"]["mlx"]["mlx"] and report["machine"]["gpu"]


def test_stream_benchmark_times_chunks_from_the_model_to_the_reader() -> None:
    report = run_bench("stream.py", "--jobs", "2", "--tokens", "6")
    fusion = report["fusion"]
    assert fusion["jobs"] == 2 and fusion["chunks_per_job"] > 0
    first = fusion["first_chunk"]
    assert 0 <= first["p50_ms"] <= first["max_ms"]
    assert report["baseline"]["p50_ms"] >= 0
    assert report["meets_target"] == (first["max_ms"] <= report["target"]["first_chunk_ms_at_most"])
