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
