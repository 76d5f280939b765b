"""OpenSlide reader: svs, tif/tiff, ndpi, vms, vmu, scn, mrxs, bif and DICOM (files or folders)."""

from __future__ import annotations

import os
import re

import numpy as np
import openslide
from PIL import Image

from ..mpp import mpp_from_properties
from .base import WSI
from .jpeg_tiles import JpegTiles

_UNSET = object()
# Formats whose levels are the file's own tiled TIFF pages, decoded by OpenSlide tile by tile as they are.
_TILED_TIFF_VENDORS = ("aperio", "generic-tiff")

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
        self._tiles = _UNSET  # JpegTiles, found on the first read

    def _native_mpp(self) -> float | None:
        mpp = mpp_from_properties(self.properties, self.custom_mpp_keys)
        if mpp is None:  # OME-TIFF keeps its pixel size in the OME-XML description only
            m = _OME_PHYSICAL_X.search(self.properties.get("tiff.ImageDescription", ""))
            if m:
                mpp = round(float(m.group(1)) * _UNIT_TO_UM.get(m.group(2) or "µm", 1.0), 4)
        return mpp

    def _jpeg_tiles(self) -> JpegTiles | None:
        """The slide's JPEG tiles, read straight from the file, when that gives OpenSlide's very pixels: a TIFF
        format whose levels are its pages, and one tile decoded both ways is identical."""
        if self._tiles is _UNSET:
            self._tiles = None
            if self.properties.get("openslide.vendor") in _TILED_TIFF_VENDORS:
                tiles = JpegTiles.open(_dicom_file(self.slide_path), self.level_dimensions)
                if tiles is not None and self._same_as_openslide(tiles):
                    self._tiles = tiles
                elif tiles is not None:
                    tiles.close()
        return self._tiles

    def _same_as_openslide(self, tiles: JpegTiles) -> bool:
        level = next(i for i, lv in enumerate(tiles.levels) if lv is not None)
        lv, ds = tiles.levels[level], self.level_downsamples[level]
        x, y = (lv.across // 2) * lv.tile_w, (lv.height // lv.tile_h // 2) * lv.tile_h  # a tile mid-slide
        mine = tiles.region(level, x, y, lv.tile_w, lv.tile_h)
        try:
            theirs = self.img.read_region((round(x * ds), round(y * ds)), level, (lv.tile_w, lv.tile_h))
        except openslide.OpenSlideError:
            self._reopen()
            return False
        return mine is not None and np.array_equal(mine, np.asarray(theirs.convert("RGB")))

    def _read_tiles(self, location, level, size, scale=1) -> np.ndarray | None:
        tiles = self._jpeg_tiles()
        if tiles is None:
            return None
        ds = self.level_downsamples[level]
        return tiles.region(level, round(location[0] / ds), round(location[1] / ds), size[0], size[1], scale)

    def can_read_reduced(self, level: int) -> bool:
        tiles = self._jpeg_tiles()
        return tiles is not None and tiles.levels[level] is not None

    def read_region_reduced(self, location, level, size, scale):
        # Approximate by design (the fast read path): positions are rounded to whole pixels at the decoded scale.
        ds = self.level_downsamples[level] * scale
        location = (round(location[0] / ds) * ds, round(location[1] / ds) * ds)
        return self._read_tiles(location, level, size, scale)

    def _read(self, location, level, size) -> np.ndarray:
        # Straight from the JPEG tiles when OpenSlide would copy whole pixels: level 0, or a level whose
        # downsample is a whole number dividing the location (otherwise cairo interpolates a sub-pixel offset).
        ds = self.level_downsamples[level]
        if ds == int(ds) and location[0] % ds == 0 and location[1] % ds == 0:
            arr = self._read_tiles(location, level, size)
            if arr is not None:
                return arr
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
        tiles = getattr(self, "_tiles", None)
        if isinstance(tiles, JpegTiles):
            tiles.close()
        self._tiles = _UNSET
        img = getattr(self, "img", None)
        if img is not None:
            img.close()
        self.img = None
