#!/usr/bin/env bash
# Download, here, the wheels bench/gpu.sh installs on a GPU machine that cannot reach PyPI: the packages
# trident_lib needs that its image lacks (it has torch, torchvision, timm, numpy, pandas, h5py, opencv,
# scikit-image, tifffile, pillow). Python 3.12, x86-64 manylinux. They land in .whl/ (git-ignored); the
# device call then names .whl in `carry`.
#
#     bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
PLATFORMS=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do PLATFORMS="$PLATFORMS --platform $p"; done
# One version each (two stop the install): those of this project's venv.
for pkg in openslide-python==1.4.7 openslide-bin==4.0.1.2 geopandas==1.2.0 shapely==2.2.0 pyproj==3.7.2 \
           imagecodecs==2026.3.6; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d .whl "$pkg"
done
du -sh .whl && ls -la .whl
