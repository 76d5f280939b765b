"""Patch grids and coordinates, exactly as TRIDENT computes them (DESIGN.md section 3)."""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import shapely
from PIL import Image, ImageDraw

from .contours import load_geojson, tissue_union
from .io import read_coords_h5, save_coords_h5, save_image
from .mpp import MAX_UPSAMPLING, check_upsampling

LEVEL_TOLERANCE = 0.1  # a pyramid level within this of the wanted downsample is read as is
VIZ_MAX_SIZE = 1024


class WSIPatcher:
    """Grid of patches over a slide, optionally kept only where a tissue mask is.

    Iterating yields ``(tile, x, y)``, or ``(x, y)`` when ``coords_only``; x, y are level-0 pixels.
    ``use_measured_mpp`` sizes patches from the slide's measured mpp instead of its nominal
    magnification (TRIDENT issue #119); off by default for compatibility. ``fast_read`` decodes JPEG tiles
    directly at the reduced size a patch needs (2, 4 or 8 times smaller) instead of reading at full size and
    resizing with bicubic interpolation: several times faster, pixels close to but not TRIDENT's; off by default.
    """

    def __init__(self, wsi: Any, patch_size: int, src_pixel_size: float | None = None,
                 dst_pixel_size: float | None = None, src_mag: int | None = None, dst_mag: int | None = None,
                 overlap: int = 0, mask: gpd.GeoDataFrame | None = None, coords_only: bool = False,
                 custom_coords: Any | None = None, threshold: float = 0.0, pil: bool = False,
                 scan_order: Literal["row-major", "col-major"] = "row-major", use_measured_mpp: bool = False,
                 fast_read: bool = False):
        wsi._lazy_initialize()
        self.wsi = wsi
        self.patch_size_target = int(patch_size)
        self.overlap = int(overlap)
        self.coords_only = coords_only
        self.pil = pil
        self.threshold = float(threshold)
        if self.overlap >= self.patch_size_target or self.overlap < 0:
            raise ValueError(f"{wsi.name}: overlap ({overlap}) must be >= 0 and smaller than the patch size "
                             f"({patch_size}).")
        if scan_order not in ("row-major", "col-major"):
            raise ValueError(f"scan_order must be 'row-major' or 'col-major', got {scan_order!r}")

        if src_pixel_size is None:
            if use_measured_mpp:
                src_pixel_size = wsi.mpp
            else:
                src_pixel_size = 10.0 / (src_mag if src_mag is not None else wsi.mag)
        if dst_pixel_size is None:
            dst_pixel_size = 10.0 / dst_mag if dst_mag is not None else src_pixel_size
        self.src_pixel_size, self.dst_pixel_size = float(src_pixel_size), float(dst_pixel_size)
        self.downsample = self.dst_pixel_size / self.src_pixel_size
        self.patch_size_src = round(self.patch_size_target * self.downsample)
        self.overlap_src = round(self.overlap * self.downsample)
        self.step = self.patch_size_src - self.overlap_src
        if self.patch_size_src < 1 or self.step < 1:
            raise ValueError(f"{wsi.name}: a {patch_size}px patch at {self.dst_pixel_size:g} um/px is under one "
                             f"level-0 pixel; choose a lower magnification or a larger patch.")

        self.level, _ = wsi.get_best_level_and_custom_downsample(self.downsample, LEVEL_TOLERANCE)
        self.read_size = round(self.patch_size_src / int(wsi.level_downsamples[self.level]))
        self.fast_read = fast_read and wsi.can_read_reduced(self.level)  # else exactly the default path
        self.resize_in_batch = False  # patches as read, resized with their batch (split_to_tensor's exact mode)
        # The largest DCT scaling that divides the read and still gives at least the patch size.
        self.read_scale = next((s for s in (8, 4, 2)
                                if self.read_size % s == 0 and self.read_size // s >= self.patch_size_target), 1)
        self.width, self.height = wsi.dimensions
        self.cols = math.ceil(self.width / self.step)
        self.rows = math.ceil(self.height / self.step)

        if custom_coords is not None:
            coords = np.asarray(custom_coords, dtype=np.int64).reshape(-1, 2)
        elif self.width < self.patch_size_src or self.height < self.patch_size_src:
            coords = np.zeros((0, 2), np.int64)  # a slide smaller than one patch has no patch
        else:
            coords = grid_coords(self.cols, self.rows, self.step, scan_order)
            if mask is not None:
                coords = filter_coords(coords, self.patch_size_src, self.patch_size_target, mask, self.threshold)
        self.valid_coords = coords
        self.mask = mask

    @classmethod
    def from_legacy_coords(cls, wsi, patch_size, patch_level, custom_downsample, coords, coords_only=False,
                           pil=False) -> "WSIPatcher":
        """Patcher over CLAM / Fishing-Rod coordinates: ``patch_size`` px read at ``patch_level``, then
        downsampled by ``custom_downsample``."""
        wsi._lazy_initialize()
        level_ds = wsi.level_downsamples[int(patch_level)]
        out_size = int(patch_size // custom_downsample)
        src = 10.0 / wsi.mag
        dst = src * (patch_size * level_ds) / out_size
        return cls(wsi, out_size, src_pixel_size=src, dst_pixel_size=dst, custom_coords=coords,
                   coords_only=coords_only, pil=pil)

    @classmethod
    def from_legacy_coords_file(cls, wsi, coords_path, coords_only=False, pil=False) -> "WSIPatcher":
        coords, attrs = read_coords_h5(coords_path)
        if "patch_level" not in attrs:
            raise ValueError(f"{coords_path}: not a legacy (CLAM) coords file: no 'patch_level' attribute.")
        custom_downsample = attrs.get("custom_downsample", attrs.get("downsample", 1))
        if isinstance(custom_downsample, (list, tuple, np.ndarray)):
            custom_downsample = custom_downsample[0]
        return cls.from_legacy_coords(wsi, int(attrs["patch_size"]), int(attrs["patch_level"]),
                                      float(custom_downsample or 1), coords, coords_only, pil)

    def __len__(self) -> int:
        return len(self.valid_coords)

    def __iter__(self):
        for x, y in self.valid_coords:
            yield (int(x), int(y)) if self.coords_only else self.get_tile_xy(int(x), int(y))

    def __getitem__(self, index):
        x, y = self.valid_coords[index]
        return (int(x), int(y)) if self.coords_only else self.get_tile_xy(int(x), int(y))

    def get_cols_rows(self) -> tuple[int, int]:
        return self.cols, self.rows

    def get_tile(self, col: int, row: int):
        return self.get_tile_xy(col * self.step, row * self.step)

    def get_tile_xy(self, x: int, y: int):
        size = (self.read_size, self.read_size)
        if self.resize_in_batch:
            return self.wsi.read_region((x, y), self.level, size, read_as="numpy"), x, y
        reduced = None
        if self.fast_read:  # also at scale 1: whole-pixel positions where OpenSlide would interpolate
            reduced = self.wsi.read_region_reduced((x, y), self.level, size, self.read_scale)
        if reduced is not None and not self.pil and reduced.shape[0] == self.patch_size_target:
            return reduced, x, y  # already the patch: no round trip through PIL
        if reduced is not None:
            tile = Image.fromarray(reduced)
        else:
            tile = self.wsi.read_region((x, y), self.level, size, read_as="pil")
        if tile.size != (self.patch_size_target, self.patch_size_target):
            tile = tile.resize((self.patch_size_target, self.patch_size_target), Image.Resampling.BICUBIC)
        return (tile if self.pil else np.asarray(tile)), x, y

    def visualize(self) -> Image.Image:
        return draw_coords(self.wsi, self.valid_coords, self.patch_size_src)


def grid_coords(cols: int, rows: int, step: int, scan_order: str = "row-major") -> np.ndarray:
    """(col * step, row * step) for every cell; row-major means sorted by y, then x."""
    xs = np.arange(cols, dtype=np.int64) * step
    ys = np.arange(rows, dtype=np.int64) * step
    if scan_order == "row-major":
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
    else:
        xx, yy = np.meshgrid(xs, ys, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def filter_coords(coords: np.ndarray, patch_size_src: int, patch_size_target: int, mask: gpd.GeoDataFrame,
                  threshold: float = 0.0):
    """Keep patches that touch tissue (threshold 0) or whose tissue share is at least ``threshold``.

    Vectorised with shapely 2: one call per predicate over all patches, never a Python loop.
    """
    if len(coords) == 0 or mask is None or len(mask) == 0:
        return coords[:0]
    # TRIDENT simplifies with a quarter of the *target* patch size, whatever the level-0 patch size: this
    # decides which edge patches survive (checked against TRIDENT's own files, tests/test_parity.py).
    union = tissue_union(mask, tolerance=patch_size_target / 4)
    if union.is_empty:
        return coords[:0]
    shapely.prepare(union)
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + patch_size_src, coords[:, 1] + patch_size_src)
    keep = shapely.intersects(boxes, union)
    if threshold > 0:
        idx = np.flatnonzero(keep)
        area = shapely.area(shapely.intersection(boxes[idx], union))
        keep[idx] = area >= threshold * float(patch_size_src) ** 2
    return coords[keep]


def max_plausible_patches(mask: gpd.GeoDataFrame, attrs: dict) -> int:
    """The most patches a tissue mask can yield with these coords attributes: a kept patch lies inside the
    tissue grown by a patch diagonal (plus the filter's simplification tolerance), and the top-left
    step x step cells of distinct patches do not overlap. More patches than this means a broken grid."""
    ps0, ps = float(attrs["patch_size_level0"]), float(attrs["patch_size"])
    step = ps0 - float(attrs.get("overlap", 0)) * ps0 / ps
    grown = tissue_union(mask).buffer(ps0 * math.sqrt(2) + ps / 4)
    return int(grown.area // (step * step)) + 1


def coords_attrs(patcher: WSIPatcher, target_mag: float, save_dir: str) -> dict:
    wsi = patcher.wsi
    return {
        "patch_size": patcher.patch_size_target,
        "patch_size_level0": patcher.patch_size_src,
        "level0_magnification": wsi.mag,
        "target_magnification": target_mag,
        "overlap": patcher.overlap,
        "name": wsi.name,
        "savetodir": save_dir,
        "level0_width": wsi.width,
        "level0_height": wsi.height,
    }


def resolve_mask(wsi, mask) -> gpd.GeoDataFrame | None:
    """A GeoDataFrame, a GeoJSON path, the contours left on the slide by ``segment_tissue``, or the slide's
    ``tissue_seg_path``."""
    if mask is None:
        mask = getattr(wsi, "gdf_contours", None)
    if mask is None:
        mask = getattr(wsi, "tissue_seg_path", None)
    if isinstance(mask, (str, os.PathLike)):
        mask = load_geojson(os.fspath(mask))
    return mask


def tissue_coords(wsi, target_mag: float, patch_size: int, overlap: int = 0, min_tissue_proportion: float = 0.0,
                  mask=None, use_measured_mpp: bool = False, save_dir: str = "",
                  max_upsampling: float = MAX_UPSAMPLING) -> tuple[np.ndarray, dict]:
    """(coords, attrs) of the tissue patches: the one implementation behind every coords output. A target
    magnification more than ``max_upsampling`` times the scan's raises TooLowResolutionError."""
    wsi._lazy_initialize()
    gdf = resolve_mask(wsi, mask)
    if gdf is None:
        raise ValueError(f"{wsi.name}: no tissue mask; run segment_tissue first or pass mask=<GeoJSON path>.")
    check_upsampling(wsi.name, wsi.mag, target_mag, max_upsampling)
    patcher = WSIPatcher(wsi, patch_size, dst_mag=target_mag, overlap=overlap, mask=gdf, coords_only=True,
                         threshold=min_tissue_proportion, use_measured_mpp=use_measured_mpp)
    return patcher.valid_coords, coords_attrs(patcher, target_mag, save_dir)


def extract_tissue_coords(wsi, target_mag: float, patch_size: int, save_coords: str | os.PathLike, overlap: int = 0,
                          min_tissue_proportion: float = 0.0, mask=None, use_measured_mpp: bool = False,
                          provenance: dict | None = None, max_upsampling: float = MAX_UPSAMPLING) -> str:
    """Coordinates of tissue patches, written to ``<save_coords>/patches/<slide>_patches.h5``."""
    save_coords = os.fspath(save_coords)
    coords, attrs = tissue_coords(wsi, target_mag, patch_size, overlap, min_tissue_proportion, mask,
                                  use_measured_mpp, save_coords, max_upsampling)
    path = os.path.join(save_coords, "patches", f"{wsi.name}_patches.h5")
    return save_coords_h5(path, coords, attrs, provenance)


def draw_coords(wsi, coords: np.ndarray, patch_size_level0: int, max_size: int = VIZ_MAX_SIZE,
                contours: gpd.GeoDataFrame | None = None) -> Image.Image:
    """Thumbnail with the patch squares (and the tissue outlines, when given) drawn on it."""
    thumb = wsi.get_thumbnail((max_size, max_size)).convert("RGB")
    sx, sy = thumb.width / wsi.width, thumb.height / wsi.height
    draw = ImageDraw.Draw(thumb)
    if contours is not None:
        for geom in contours.geometry:
            for ring in [geom.exterior, *geom.interiors]:
                draw.line([(x * sx, y * sy) for x, y in ring.coords], fill=(0, 200, 0), width=2)
    for x, y in np.asarray(coords):
        draw.rectangle([x * sx, y * sy, (x + patch_size_level0) * sx, (y + patch_size_level0) * sy],
                       outline=(255, 0, 0), width=1)
    return thumb


def visualize_coords(wsi, coords_path: str | os.PathLike, save_patch_viz: str | os.PathLike) -> str:
    coords_path, save_patch_viz = os.fspath(coords_path), os.fspath(save_patch_viz)
    coords, attrs = read_coords_h5(coords_path)
    img = draw_coords(wsi, coords, int(attrs.get("patch_size_level0", 256)))
    return save_image(os.path.join(save_patch_viz, f"{wsi.name}.jpg"), img, quality=90)


def patcher_from_coords(wsi, coords: np.ndarray, attrs: dict, pil: bool = False,
                        fast_read: bool = False) -> WSIPatcher:
    """A patcher that reads exactly the listed patches, sized as the coords attributes say."""
    src = 10.0 / float(attrs["level0_magnification"])
    dst = src * int(attrs["patch_size_level0"]) / int(attrs["patch_size"])
    return WSIPatcher(wsi, int(attrs["patch_size"]), src_pixel_size=src, dst_pixel_size=dst,
                      custom_coords=coords, pil=pil, fast_read=fast_read)


def patcher_from_coords_file(wsi, coords_path: str, pil: bool = False) -> WSIPatcher:
    """The same, from a TRIDENT coords file or a legacy CLAM one."""
    coords, attrs = read_coords_h5(coords_path)
    if "target_magnification" not in attrs:
        return WSIPatcher.from_legacy_coords_file(wsi, coords_path, pil=pil)
    return patcher_from_coords(wsi, coords, attrs, pil)


def dump_patches(wsi, coords_path: str | os.PathLike, save_patches_dir: str | os.PathLike, max_patches: int = 0,
                 image_format: str = "png", jpeg_quality: int = 90) -> str:
    coords_path, save_patches_dir = os.fspath(coords_path), os.fspath(save_patches_dir)
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out_dir = os.path.join(save_patches_dir, wsi.name)
    patcher = patcher_from_coords_file(wsi, coords_path, pil=True)
    kwargs = {"quality": int(jpeg_quality)} if image_format == "jpg" else {}
    for i, (tile, x, y) in enumerate(patcher):
        if max_patches and i >= max_patches:
            break
        save_image(os.path.join(out_dir, f"{wsi.name}_x{x}_y{y}.{image_format}"), tile, **kwargs)
    return out_dir
