"""Run every benchmark in turn (each prints its own table and writes bench/results/<name>.json)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("bench_segmentation.py", "bench_read.py", "bench_features.py", "bench_platform.py", "bench_memory.py"):
    print(f"\n=== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
