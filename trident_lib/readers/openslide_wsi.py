"""OpenSlide reader: svs, tif/tiff, ndpi, vms, vmu, scn, mrxs, bif and DICOM (files or folders)."""

from __future__ import annotations

import os
import re

import numpy as np
import openslide
from PIL import Image

from ..mpp import mpp_from_properties
from .base import WSI

_OME_PHYSICAL_X = re.compile(r'PhysicalSizeX="([0-9.eE+-]+)"(?:\s+PhysicalSizeXUnit="([^"]+)")?')
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _dicom_file(path: str) -> str:
    """OpenSlide opens a DICOM series from any of its files; accept the folder too."""
    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(".dcm"))
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no .dcm files")
    return os.path.join(path, files[0])


class OpenSlideWSI(WSI):
    reader_type = "openslide"

    def _open(self) -> None:
        self.img = openslide.OpenSlide(_dicom_file(self.slide_path))
        self.blank_tiles, self.read_errors = 0, []
        self.level_dimensions = [tuple(map(int, d)) for d in self.img.level_dimensions]
        self.level_downsamples = [float(d) for d in self.img.level_downsamples]
        self.properties = dict(self.img.properties)

    def _native_mpp(self) -> float | None:
        mpp = mpp_from_properties(self.properties, self.custom_mpp_keys)
        if mpp is None:  # OME-TIFF keeps its pixel size in the OME-XML description only
            m = _OME_PHYSICAL_X.search(self.properties.get("tiff.ImageDescription", ""))
            if m:
                mpp = round(float(m.group(1)) * _UNIT_TO_UM.get(m.group(2) or "µm", 1.0), 4)
        return mpp

    def _read(self, location, level, size) -> np.ndarray:
        # Plain RGB conversion turns OpenSlide's transparent out-of-slide pixels black, as TRIDENT does.
        try:
            return np.asarray(self.img.read_region(location, level, size).convert("RGB"))
        except openslide.OpenSlideError as e:
            return self._read_damaged(location, level, size, e)

    def _reopen(self) -> None:
        # OpenSlide handles are unusable after an error: start a fresh one.
        self.img.close()
        self.img = openslide.OpenSlide(_dicom_file(self.slide_path))

    def _read_damaged(self, location, level, size, error) -> np.ndarray:
        """A region with a corrupt tile: retry from level 0 (other tiles), else give a blank region and
        count it, so a few damaged tiles never stop a slide (``blank_tiles`` says how many)."""
        self._reopen()
        if level > 0:
            ds = self.level_downsamples[level]
            try:
                big = self.img.read_region(location, 0, (round(size[0] * ds), round(size[1] * ds)))
                return np.asarray(big.convert("RGB").resize(size, Image.Resampling.BILINEAR))
            except openslide.OpenSlideError:
                self._reopen()
        self.blank_tiles += 1
        self.read_errors.append(f"{location}@{level}: {error}")
        return np.zeros((size[1], size[0], 3), np.uint8)

    def get_thumbnail(self, size):
        self._lazy_initialize()
        return self.img.get_thumbnail(size).convert("RGB")

    def _close(self) -> None:
        img = getattr(self, "img", None)
        if img is not None:
            img.close()
        self.img = None
