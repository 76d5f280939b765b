"""Plain images -> pyramidal tiled TIFFs that OpenSlide opens with the right pixel size."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from .io import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class AnyToTiffConverter:
    """Convert png/jpg/tif images to pyramidal, JPEG-tiled TIFFs with TIFF resolution tags.

    The mpp is stored as pixels per centimetre (10,000 / mpp), which OpenSlide reports as
    ``openslide.mpp-x`` (TRIDENT's converter stores a value that reads back 10x too small).
    """

    def __init__(self, job_dir: str, bigtiff: bool = False):
        self.job_dir = os.fspath(job_dir)
        self.bigtiff = bigtiff
        os.makedirs(self.job_dir, exist_ok=True)

    def process_file(self, input_file: str, mpp: float, zoom: float) -> str:
        """Write ``<job_dir>/<name>.tif`` from ``input_file`` (``mpp`` of the input, resized by ``zoom``)."""
        input_file = os.fspath(input_file)
        if not mpp or mpp <= 0:
            raise ValueError(f"{input_file}: a positive mpp is required to convert it.")
        with Image.open(input_file) as img:
            arr = np.asarray(img.convert("RGB"))
        if zoom != 1:
            h, w = arr.shape[:2]
            arr = cv2.resize(arr, (max(1, round(w * zoom)), max(1, round(h * zoom))), interpolation=cv2.INTER_AREA)
        out_mpp = mpp / zoom
        name = os.path.splitext(os.path.basename(input_file))[0]
        path = os.path.join(self.job_dir, f"{name}.tif")
        with atomic_path(path) as tmp:
            write_pyramid(tmp, arr, out_mpp, self.bigtiff)
        return path

    def process_all(self, input_dir: str, mpp_csv: str, downscale_by: int = 1, num_workers: int = 1) -> list[str]:
        """Convert every image listed in ``mpp_csv`` (columns ``wsi``, ``mpp``) found in ``input_dir``."""
        input_dir, mpp_csv = os.fspath(input_dir), os.fspath(mpp_csv)
        table = pd.read_csv(mpp_csv)
        missing = {"wsi", "mpp"} - set(table.columns)
        if missing:
            raise ValueError(f"{mpp_csv}: missing column(s) {sorted(missing)}; it needs 'wsi' and 'mpp'.")
        jobs = []
        for wsi, mpp in zip(table["wsi"], table["mpp"]):
            path = os.path.join(input_dir, str(wsi))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {mpp_csv} but not found.")
            if not str(wsi).lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(f"{path}: not an image the converter reads ({', '.join(IMAGE_EXTENSIONS)}).")
            jobs.append((path, float(mpp), 1.0 / downscale_by))
        if num_workers <= 1:
            return [self.process_file(*job) for job in jobs]
        with ProcessPoolExecutor(num_workers) as pool:
            return list(pool.map(self.process_file, *zip(*jobs)))


def write_pyramid(path: str, arr: np.ndarray, mpp: float, bigtiff: bool = False, tile: int = 256) -> None:
    """Levels halve until the image is under one tile; each level carries its own resolution."""
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        level, ds = arr, 1
        while True:
            per_cm = 1e4 / (mpp * ds)
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="jpeg",
                      compressionargs={"level": 90}, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                      subfiletype=1 if ds > 1 else 0, metadata=None)
            if max(level.shape[:2]) <= tile:
                break
            h, w = level.shape[:2]
            level = cv2.resize(level, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
            ds *= 2
