"""Shared helpers for the benchmarks: cached synthetic slides, peak memory, result files."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("TRIDENT_BENCH_CACHE", "/tmp/trident-bench"))
RESULTS = ROOT / "bench" / "results"


def cached_slide(name: str, spec) -> str:
    """Write the slide once; later runs reuse it (generation is not what we measure)."""
    from trident_lib.synthetic import write_slide

    path = CACHE / f"{name}.svs"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_slide(str(path), spec)
        print(f"(generated {path} in {time.perf_counter() - t0:.0f}s)")
    return str(path)


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children (data-loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(f"results written to {RESULTS / (name + '.json')}")
