#!/usr/bin/env bash
# The GPU benchmark (bench/bench_gpu.py) from a clean copy of the repository, in under 5 minutes, with no
# download: the packages the GPU machine's image lacks come as wheels in .whl/ (bench/gpu_wheels.sh fetches
# them beforehand). Results: $OUT/gpu.json (bench/results/gpu.json when OUT is unset).
#
# On the device machine (one call; names .whl in carry):
#     bash bench/gpu.sh
# Without a GPU it runs the CPU fallback (small slide, small batches), which checks the script works:
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python  # a developer machine: the project's environment
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import openslide, geopandas" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SMALL=--small
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && SMALL=
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONUNBUFFERED=1
timeout 290 $PY bench/bench_gpu.py --out "$OUT" $SMALL --budget 240 "$@"
