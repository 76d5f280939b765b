"""Readers whose backends are optional packages: CuCIM (GPU decoding) and SDPC (Shengqiang scanners)."""

from __future__ import annotations

import numpy as np

from ..errors import MissingDependencyError
from .base import WSI


class CuCIMWSI(WSI):
    reader_type = "cucim"

    def _open(self) -> None:
        try:
            from cucim import CuImage
        except ImportError as e:
            raise MissingDependencyError("The CuCIM reader", "cucim-cu12") from e
        self.img = CuImage(self.slide_path)
        res = self.img.resolutions
        self.level_dimensions = [tuple(map(int, d)) for d in res["level_dimensions"]]
        self.level_downsamples = [float(d) for d in res["level_downsamples"]]
        self.properties = {"cucim.mpp-x": str(self.img.spacing()[0])} if self.img.spacing_units()[0] in (
            "micrometer", "µm") else {}
        meta = self.img.metadata.get("aperio", {}) if isinstance(self.img.metadata, dict) else {}
        if "MPP" in meta:
            self.properties["aperio.MPP"] = str(meta["MPP"])

    def _native_mpp(self):
        value = self.properties.get("aperio.MPP") or self.properties.get("cucim.mpp-x")
        return round(float(value), 4) if value else super()._native_mpp()

    def _read(self, location, level, size) -> np.ndarray:
        region = np.asarray(self.img.read_region(location=location, size=size, level=level))
        return np.ascontiguousarray(region[:, :, :3])

    def _close(self) -> None:
        self.img = None


class SDPCWSI(WSI):
    reader_type = "sdpc"

    def _open(self) -> None:
        try:
            import sdpc
        except ImportError as e:
            raise MissingDependencyError("The SDPC reader", "sdpc-for-python") from e
        self.img = sdpc.Sdpc(self.slide_path)
        self.level_dimensions = [tuple(map(int, d)) for d in self.img.level_dimensions]
        self.level_downsamples = [float(d) for d in self.img.level_downsamples]
        self.properties = {"sdpc.mpp-x": str(self.img.readSdpc(self.slide_path).contents.picHead.contents.ruler)}

    def _native_mpp(self):
        value = self.properties.get("sdpc.mpp-x")
        return round(float(value), 4) if value else None

    def _read(self, location, level, size) -> np.ndarray:
        region = np.asarray(self.img.read_region(location, level, size))
        return np.ascontiguousarray(region[:, :, :3])

    def _close(self) -> None:
        img = getattr(self, "img", None)
        if img is not None and hasattr(img, "close"):
            img.close()
        self.img = None
