"""Zeiss CZI reader (pylibCZIrw). The slide's origin is moved to (0, 0); 16-bit and grey become 8-bit RGB."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import WSI
from .omezarr_wsi import to_uint8_rgb


class CZIWSI(WSI):
    reader_type = "czi"

    def _open(self) -> None:
        from pylibCZIrw import czi as pyczi

        self._ctx = pyczi.open_czi(self.slide_path)
        self.doc = self._ctx.__enter__()
        rect = self.doc.total_bounding_rectangle
        self.origin = (rect.x, rect.y)  # CZI coordinates can start anywhere, even below zero
        w, h = int(rect.w), int(rect.h)
        md = (self.doc.metadata or {}).get("ImageDocument", {}).get("Metadata", {}) or {}
        self.pixel_type = self.doc.pixel_types.get(0, "Bgr24")
        bits = (md.get("Information", {}) or {}).get("Image", {}) or {}
        self.bit_depth = int(bits.get("ComponentBitCount") or (16 if "16" in self.pixel_type or "48" in
                                                                self.pixel_type else 8))
        self.properties = {"czi.pixel_type": self.pixel_type, "czi.bit_depth": str(self.bit_depth)}
        for item in ((md.get("Scaling") or {}).get("Items") or {}).get("Distance") or []:
            if item.get("@Id") == "X" and item.get("Value"):
                self.properties["czi.mpp-x"] = str(float(item["Value"]) * 1e6)  # metres -> micrometres
        # Virtual pyramid: pylibCZIrw reads any zoom; expose power-of-two levels down to ~512 px.
        self.level_dimensions, self.level_downsamples = [], []
        ds = 1
        while not self.level_dimensions or max(w, h) / ds >= 512:
            self.level_dimensions.append((max(1, w // ds), max(1, h // ds)))
            self.level_downsamples.append(float(ds))
            ds *= 2

    def _native_mpp(self) -> float | None:
        value = self.properties.get("czi.mpp-x")
        return round(float(value), 4) if value else None

    def _read(self, location, level, size) -> np.ndarray:
        ds = self.level_downsamples[level]
        w, h = size
        roi = (self.origin[0] + int(location[0]), self.origin[1] + int(location[1]),
               max(1, round(w * ds)), max(1, round(h * ds)))
        data = self.doc.read(roi=roi, zoom=1.0 / ds, plane={"C": 0, "Z": 0, "T": 0})
        if data.shape[2] >= 3:
            data = data[:, :, 2::-1]  # BGR -> RGB
        if data.dtype != np.uint8:
            data = np.clip(data.astype(np.float32) * (255.0 / (2**self.bit_depth - 1)), 0, 255).astype(np.uint8)
        rgb = to_uint8_rgb(data)
        if rgb.shape[:2] != (h, w):  # zoomed reads can be off by a pixel
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
        return rgb

    def _close(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)
        self._ctx = self.doc = None
