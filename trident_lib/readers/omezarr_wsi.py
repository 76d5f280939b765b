"""OME-Zarr (OME-NGFF multiscales) reader."""

from __future__ import annotations

import numpy as np

from .base import WSI

_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
               "angstrom": 1e-4}


def to_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) of any dtype -> (H, W, 3) uint8: grey is repeated, >8-bit is scaled by its dtype range."""
    if arr.dtype != np.uint8:
        top = np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else max(float(arr.max()), 1e-12)
        arr = np.clip(arr.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


class OMEZarrWSI(WSI):
    reader_type = "omezarr"

    def _open(self) -> None:
        import zarr

        self.group = zarr.open_group(self.slide_path, mode="r")
        attrs = dict(self.group.attrs)
        ms = (attrs.get("ome") or attrs)["multiscales"][0]
        self.axes = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
        self.arrays = [self.group[d["path"]] for d in ms["datasets"]]
        xi, yi = self.axes.index("x"), self.axes.index("y")
        self.level_dimensions = [(int(a.shape[xi]), int(a.shape[yi])) for a in self.arrays]
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / w for w, _ in self.level_dimensions]
        self.properties = {"omezarr.version": str(ms.get("version", ""))}
        scale = next((t["scale"] for t in ms["datasets"][0].get("coordinateTransformations", [])
                      if t.get("type") == "scale"), None)
        unit = ms["axes"][xi].get("unit", "micrometer") if isinstance(ms["axes"][xi], dict) else "micrometer"
        if scale is not None and unit in _UNIT_TO_UM:
            self.properties["omezarr.mpp-x"] = str(scale[xi] * _UNIT_TO_UM[unit])

    def _native_mpp(self) -> float | None:
        value = self.properties.get("omezarr.mpp-x")
        return round(float(value), 4) if value else None

    def _read(self, location, level, size) -> np.ndarray:
        arr = self.arrays[level]
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        w, h = size
        out = np.zeros((h, w, 3), np.uint8)
        xs, ys, xe, ye = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        if xe <= xs or ye <= ys:
            return out
        index = []
        for name in self.axes:
            index.append(slice(ys, ye) if name == "y" else slice(xs, xe) if name == "x"
                         else slice(None) if name == "c" else 0)
        data = np.asarray(arr[tuple(index)])
        kept = [n for n in self.axes if n in ("y", "x", "c")]
        data = data.transpose([kept.index(n) for n in ("y", "x", "c") if n in kept])
        if data.ndim == 2:
            data = data[:, :, None]
        out[ys - y0:ye - y0, xs - x0:xe - x0] = to_uint8_rgb(data)
        return out

    def _close(self) -> None:
        self.group = None
        self.arrays = []
