"""Synthetic slides with known geometry: pyramidal JPEG-tiled TIFFs that OpenSlide reads.

Used by the tests, the benchmarks and the platform's sample cohort. Tissue is a set of ellipses
(with optional elliptical holes) in level-0 pixels, rendered tile by tile, so slides of any size
are written without holding them in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import tifffile

BACKGROUND = (242, 240, 244)
TILE = 256


@dataclass
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0


@dataclass
class SlideSpec:
    width: int
    height: int
    mpp: float | None = 0.25
    app_mag: int | None = 40
    tissue: list[Ellipse] = field(default_factory=list)
    holes: list[Ellipse] = field(default_factory=list)
    levels: int = 3
    level_scale: int = 2  # downsample between consecutive levels (Aperio scanners write 4: 40x, 10x, 2.5x)
    compression: str = "jpeg"  # or e.g. "zlib", for readers that only take JPEG tiles
    style: str = "aperio"  # "aperio" (description with MPP), "resolution" (TIFF tags only), "plain" (no mpp)
    seed: int = 0

    def render(self, x0: int, y0: int, w: int, h: int, step: float = 1.0) -> np.ndarray:
        """(h, w, 3) uint8 pixels of the region whose top-left is (x0, y0) at ``step`` level-0 px per pixel."""
        xs = x0 + (np.arange(w) + 0.5) * step
        ys = y0 + (np.arange(h) + 0.5) * step
        X, Y = np.meshgrid(xs, ys)
        tissue = np.zeros((h, w), bool)
        for e in self.tissue:
            tissue |= e.inside(X, Y)
        for e in self.holes:
            tissue &= ~e.inside(X, Y)
        rng = np.random.default_rng(self.seed + x0 * 7919 + y0 * 104729 + int(step * 31))
        noise = rng.integers(-4, 5, size=(h, w, 1))
        out = np.empty((h, w, 3), np.int16)
        out[:] = BACKGROUND
        if tissue.any():
            # Eosin-pink stroma with haematoxylin-purple nuclei on a level-0 grid of blobs.
            nuclei = (np.sin(X / 9.0) * np.sin(Y / 11.0)) > 0.55
            pink = np.array([226, 140, 186]) + rng.integers(-12, 13, size=(h, w, 3))
            purple = np.array([120, 60, 150]) + rng.integers(-12, 13, size=(h, w, 3))
            colour = np.where(nuclei[..., None], purple, pink)
            out[tissue] = colour[tissue]
        out += noise
        return np.clip(out, 0, 255).astype(np.uint8)


def _description(spec: SlideSpec, w: int, h: int) -> str:
    if spec.style != "aperio":
        return ""
    fields = [f"Aperio Image Library v12.0.0 \n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q=90"]
    if spec.app_mag is not None:
        fields.append(f"AppMag = {spec.app_mag}")
    if spec.mpp is not None:
        fields.append(f"MPP = {spec.mpp}")
    return "|".join(fields)


def write_slide(path: str, spec: SlideSpec) -> str:
    """Write ``spec`` as a pyramidal, JPEG-compressed (by default), tiled TIFF; each level is ``level_scale``
    times smaller than the one above."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".part"
    with tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height > 2**31) as tif:
        for level in range(spec.levels):
            ds = spec.level_scale**level
            w, h = max(1, spec.width // ds), max(1, spec.height // ds)
            if level and min(w, h) < TILE:
                break

            def tiles(ds=ds, w=w, h=h):
                for ty in range(0, h, TILE):
                    for tx in range(0, w, TILE):
                        yield spec.render(tx * ds, ty * ds, TILE, TILE, ds)

            kwargs = {}
            if spec.style == "resolution" and spec.mpp:
                per_cm = 1e4 / (spec.mpp * ds)
                kwargs = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            quality = {"level": 90} if spec.compression == "jpeg" else {}
            tif.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression=spec.compression, compressionargs=quality, description=_description(spec, w, h),
                      subfiletype=1 if level else 0, metadata=None, **kwargs)
    os.replace(tmp, path)
    return path


# Ready-made slides for tests and the sample cohort. Sizes are level 0 at 40x (0.25 mpp) unless noted.
def standard_specs() -> dict[str, SlideSpec]:
    blob = [Ellipse(1500, 1200, 900, 700), Ellipse(3300, 2600, 600, 500)]
    return {
        "aperio_40x": SlideSpec(4096, 3072, tissue=blob),
        "aperio_20x": SlideSpec(2048, 1536, mpp=0.5, app_mag=20,
                                tissue=[Ellipse(750, 600, 450, 350), Ellipse(1650, 1300, 300, 250)]),
        "odd_mpp": SlideSpec(4096, 3072, mpp=0.263, app_mag=40, tissue=blob),
        "resolution_tags": SlideSpec(4096, 3072, style="resolution", tissue=blob),
        "no_mpp": SlideSpec(2048, 2048, style="plain", mpp=None, tissue=blob[:1]),
        "single_level": SlideSpec(2048, 2048, levels=1, tissue=[Ellipse(1000, 1000, 700, 600)]),
        # The hole must stay above the 5000-px hole filling of Otsu at 1.25x (radius > 1300 at 40x).
        "with_holes": SlideSpec(6144, 6144, tissue=[Ellipse(3072, 3072, 2800, 2800)],
                                holes=[Ellipse(3072, 3072, 1400, 1400)]),
        "background": SlideSpec(2048, 2048, tissue=[]),
        "tiny": SlideSpec(300, 200, levels=1, tissue=[Ellipse(150, 100, 120, 80)]),
    }


def write_standard_slides(folder: str, names: list[str] | None = None) -> dict[str, str]:
    specs = standard_specs()
    out = {}
    for name in names or list(specs):
        out[name] = write_slide(os.path.join(folder, f"{name}.tif" if specs[name].style != "aperio" else
                                             f"{name}.svs"), specs[name])
    return out
