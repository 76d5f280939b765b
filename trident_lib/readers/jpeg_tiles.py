"""JPEG tiles of a TIFF pyramid, decoded straight from the file.

OpenSlide decodes such tiles with libjpeg-turbo too (its direct path: JPEG, 8 bits, 3 samples, contiguous, RGB or
YCbCr, the colour space taken from the TIFF's photometric tag), then paints them through cairo, which costs more
than the decoding itself. Decoding the same bytes the same way gives the same pixels, several times faster;
OpenSlideWSI checks that on one tile of each slide before relying on it.

Full-size tiles are decoded with imagecodecs (OpenSlide's libjpeg calls: JPEG tables, colour space). libjpeg can
also decode at 1/2, 1/4 or 1/8 of the size by scaling its inverse DCT (OpenCV's reduced reads, Pillow's ``draft``):
cheaper than a full decode followed by a resize, and what the opt-in fast read path uses.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import imagecodecs
import numpy as np

JPEG, CONTIG, RGB, YCBCR = 7, 1, 2, 6  # TIFF tag values
CACHE_BYTES = 8 << 20  # decoded tiles kept per reader process: neighbouring patches that overlap share tiles


@dataclass(frozen=True)
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple
    counts: tuple
    tables: bytes | None
    jpegmode: str  # libjpeg's input colour space, as OpenSlide sets it from the photometric tag

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.tile_w)


def _level(page) -> _Level | None:
    """The page's tiles when OpenSlide would decode them with libjpeg directly; None otherwise."""
    ok = (page.is_tiled and int(page.compression) == JPEG and int(page.planarconfig) == CONTIG
          and int(page.photometric) in (RGB, YCBCR) and page.bitspersample == 8 and page.samplesperpixel == 3
          and getattr(page, "imagedepth", 1) == 1)
    if not ok:
        return None
    return _Level(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength, tuple(page.dataoffsets),
                  tuple(page.databytecounts), page.jpegtables or None,
                  "RGB" if int(page.photometric) == RGB else "YCbCr")


def _rgb_named(stream: bytes) -> bytes:
    """libjpeg takes a 3-component stream without JFIF or Adobe marker as YCbCr unless its components are named
    'R', 'G', 'B'; Aperio's RGB tiles name them 0, 1, 2. Rename them in the frame and scan headers."""
    data, i, names = bytearray(stream), 2, {}
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2) and data[i + 9] == 3:  # frame header: id, sampling, table per component
            for k, new in enumerate(b"RGB"):
                names[data[i + 10 + 3 * k]] = new
                data[i + 10 + 3 * k] = new
        elif marker == 0xDA:  # scan header: id, tables per component; the entropy-coded data follows
            for k in range(data[i + 4]):
                data[i + 5 + 2 * k] = names.get(data[i + 5 + 2 * k], data[i + 5 + 2 * k])
            break
        i += 2 + length
    return bytes(data)


class JpegTiles:
    """The JPEG-tiled levels of one TIFF file. ``levels[i]`` is None where level i cannot be read here."""

    def __init__(self, path: str, levels: list[_Level | None]):
        self.path = path
        self.levels = levels
        # pread on a raw descriptor: no shared file position, so forked data-loader workers can share it.
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0

    @classmethod
    def open(cls, path: str, level_dimensions) -> JpegTiles | None:
        """The file's pages matched to the reader's levels by size; None when no level has JPEG tiles."""
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                pages = [p for p in tif.pages if p.is_tiled]
                levels = []
                for w, h in level_dimensions:
                    page = next((p for p in pages if (p.imagewidth, p.imagelength) == (w, h)), None)
                    levels.append(_level(page) if page is not None else None)
        except Exception:  # noqa: BLE001  not a TIFF tifffile can read: the caller keeps OpenSlide
            return None
        return cls(path, levels) if any(levels) else None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    def _tile(self, lv: _Level, index: int, scale: int):
        """Decoded tile (None where the file has no tile: OpenSlide leaves it transparent); raises when the tile
        does not decode."""
        count = lv.counts[index]
        if not count:
            return None
        key = (id(lv), index, scale)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = os.pread(self._fd, count, lv.offsets[index])
        if scale == 1:  # imagecodecs: the same libjpeg-turbo calls as OpenSlide's, half Pillow's cost here
            tile = imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace=lv.jpegmode.upper(),
                                            outcolorspace="RGB")
            if tile.shape != (lv.tile_h, lv.tile_w, 3):
                raise ValueError(f"tile {index}: shape {tile.shape}, expected {lv.tile_h}x{lv.tile_w} RGB")
            return self._keep(key, tile)
        if lv.tables:  # abbreviated stream (Aperio): the tables without their EOI, then the tile without its SOI
            data = lv.tables[:-2] + data[2:]
        if lv.jpegmode == "RGB":
            data = _rgb_named(data)
        flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)  # OpenCV's libjpeg-turbo, little overhead
        if bgr is None or bgr.shape != (lv.tile_h // scale, lv.tile_w // scale, 3):
            raise ValueError(f"tile {index} does not decode to {lv.tile_w}x{lv.tile_h} RGB")
        return self._keep(key, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def _keep(self, key, tile: np.ndarray) -> np.ndarray:
        self._cache[key] = tile
        self._cached_bytes += tile.nbytes
        while self._cached_bytes > CACHE_BYTES:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def region(self, level: int, x: int, y: int, w: int, h: int, scale: int = 1) -> np.ndarray | None:
        """(h // scale, w // scale, 3) uint8 RGB of the level's pixels from (x, y), in level coordinates that are
        multiples of ``scale`` (1, 2, 4 or 8), decoded at 1/scale. Pixels outside the level are black, as
        OpenSlide's transparent ones become. None when a tile does not decode here (the caller falls back)."""
        lv = self.levels[level] if 0 <= level < len(self.levels) else None
        if lv is None or lv.tile_w % scale or lv.tile_h % scale:
            return None
        out = np.zeros((h // scale, w // scale, 3), np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        for row in range(y0 // lv.tile_h, math.ceil(y1 / lv.tile_h) if y1 > y0 else 0):
            for col in range(x0 // lv.tile_w, math.ceil(x1 / lv.tile_w) if x1 > x0 else 0):
                try:
                    tile = self._tile(lv, row * lv.across + col, scale)
                except Exception:  # noqa: BLE001  damaged tile: OpenSlide's path decides what to show
                    return None
                if tile is None:
                    continue
                tx, ty = col * lv.tile_w, row * lv.tile_h
                ax, bx = max(x0, tx), min(x1, tx + lv.tile_w)  # overlap in level pixels
                ay, by = max(y0, ty), min(y1, ty + lv.tile_h)
                out[(ay - y) // scale:(by - y) // scale, (ax - x) // scale:(bx - x) // scale] = \
                    tile[(ay - ty) // scale:(by - ty) // scale, (ax - tx) // scale:(bx - tx) // scale]
        return out
