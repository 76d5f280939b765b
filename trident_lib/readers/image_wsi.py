"""Plain images (png, jpg, non-pyramidal TIFF) as single-level slides."""

from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image

from ..errors import SlideTooLargeError
from .base import WSI

_PIL_LIMIT_LOCK = threading.Lock()


def memory_budget_bytes() -> int:
    """Half of the machine's physical memory: the most one decoded image may take."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class ImageWSI(WSI):
    """The image is decoded once, as RGB, and regions are cropped from that single copy.

    The size is checked from the header before decoding, so an image that cannot fit in
    memory is refused with a clear error instead of exhausting the machine.
    """

    reader_type = "image"

    def _open(self) -> None:
        with _PIL_LIMIT_LOCK:  # our own size check replaces PIL's decompression-bomb limit
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(self.slide_path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        w, h = img.size
        need = w * h * (len(img.getbands()) + 3)  # decoded source plus the RGB copy, briefly
        budget = memory_budget_bytes()
        if need > budget:
            img.close()
            raise SlideTooLargeError(
                self.slide_path,
                f"is {w} x {h} pixels; decoding it needs about {need / 2**30:.1f} GiB, more than the "
                f"{budget / 2**30:.1f} GiB this reader allows.",
                "convert it to a pyramidal tiled TIFF (trident_lib.AnyToTiffConverter) and read that with OpenSlide.",
            )
        self.properties = {k: str(v) for k, v in img.info.items() if isinstance(v, (str, int, float, tuple))}
        res = self._tiff_mpp(img)
        if res is not None:
            self.properties["tiff.mpp"] = str(res)
        self.img = img if img.mode == "RGB" else img.convert("RGB")
        if self.img is not img:
            img.close()
        self.img.load()
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]

    @staticmethod
    def _tiff_mpp(img: Image.Image) -> float | None:
        tags = getattr(img, "tag_v2", None)
        if not tags or 282 not in tags:
            return None
        x_res, unit = float(tags[282]), int(tags.get(296, 2))
        if x_res <= 0 or unit not in (2, 3):
            return None
        return round((25400.0 if unit == 2 else 10000.0) / x_res, 4)

    def _native_mpp(self) -> float | None:
        value = self.properties.get("tiff.mpp")
        return float(value) if value else None

    def _read(self, location, level, size) -> np.ndarray:
        x, y = location
        # PIL fills the area outside the image with black, as OpenSlide-derived reads do.
        return np.asarray(self.img.crop((x, y, x + size[0], y + size[1])))

    def get_thumbnail(self, size):
        self._lazy_initialize()
        w, h = self.img.size
        factor = max(1, int(min(w / size[0], h / size[1])))
        thumb = self.img.reduce(factor)  # never a full-size copy
        thumb.thumbnail(size, Image.Resampling.LANCZOS)
        return thumb

    def _close(self) -> None:
        img = getattr(self, "img", None)
        if img is not None:
            img.close()
        self.img = None
