"""Tissue segmentation of a whole slide: tiles through a data loader, one mask, polygons, pictures."""

from __future__ import annotations

import os
import time

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import torch
from PIL import Image

from .contours import gdf_from_polygons, mask_to_gdf, save_geojson, tissue_union
from .data import WSIPatcherDataset, make_loader
from .io import save_image
from .patching import WSIPatcher, draw_coords, grid_coords

THUMBNAIL_SIZE = 1024


class SegmentationPatcher(WSIPatcher):
    """The tiles segmentation models see: shrunk from the read size with plain bilinear interpolation
    (cv2 INTER_LINEAR: a few source pixels per output pixel, no antialiasing), not the PIL bicubic of
    feature patches. TRIDENT's Otsu masks match tiles made this way pixel for pixel, and not the others."""

    def get_tile_xy(self, x: int, y: int):
        tile = self.wsi.read_region((x, y), self.level, (self.read_size, self.read_size), read_as="numpy")
        if self.read_size != self.patch_size_target:
            size = (self.patch_size_target, self.patch_size_target)
            tile = cv2.resize(np.ascontiguousarray(tile), size, interpolation=cv2.INTER_LINEAR)
        return (Image.fromarray(tile) if self.pil else tile), x, y


def segmentation_mag(wsi, model, target_mag: float | None = None) -> float:
    """The model's own magnification (or the one given), never above what the slide was scanned at."""
    mag = getattr(model, "target_mag", None) or target_mag or 10
    return min(float(mag), float(wsi.mag))


def predict_mask(wsi, model, target_mag: float | None = None, batch_size: int = 16, device: str = "cpu",
                 num_workers: int | None = None, verbose: bool = False, collate_fn=None,
                 inference_fn=None) -> tuple[np.ndarray, float]:
    """(H, W) uint8 class map over the whole slide at the model's magnification, and its scale in level-0
    pixels per mask pixel. Tiles are read and transformed in worker processes while the model runs.

    ``collate_fn`` / ``inference_fn`` follow the seed's ``segment_semantic`` contract: a custom batch is a
    dict with ``xcoords`` and ``ycoords`` (and ``img`` when there is no ``inference_fn``), and
    ``inference_fn(model, batch, device)`` returns (B, H, W) uint8.
    """
    wsi._lazy_initialize()
    mag = segmentation_mag(wsi, model, target_mag)
    if getattr(model, "whole_slide", False):
        return _whole_slide_mask(wsi, model, mag)
    size = model.input_size
    # TRIDENT sizes segmentation tiles from the measured pixel size (mpp -> 10 / mag), not the magnification
    # bucket: CMU-1-Small-Region (0.499 um/px) gets 8208-px tiles at 1.25x, not 8192.
    patcher = SegmentationPatcher(wsi, size, src_pixel_size=wsi.mpp, dst_pixel_size=10.0 / mag, pil=True)
    patcher.valid_coords = grid_coords(patcher.cols, patcher.rows, patcher.step)  # every tile, even partial
    loader = make_loader(WSIPatcherDataset(patcher, model.eval_transforms), batch_size, num_workers, device)
    if collate_fn is not None:
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=batch_size, collate_fn=collate_fn,
                                             num_workers=loader.num_workers)
    full = np.zeros((patcher.rows * size, patcher.cols * size), np.uint8)
    model = model.to(device)
    with torch.inference_mode():
        for batch in loader:
            if collate_fn is not None:
                xs, ys = batch["xcoords"], batch["ycoords"]
                pred = inference_fn(model, batch, device) if inference_fn else model(batch["img"].to(device))
            else:
                imgs, (xs, ys) = batch
                pred = inference_fn(model, (imgs, (xs, ys)), device) if inference_fn else \
                    model(imgs.to(device, non_blocking=True))
            pred = pred.cpu().numpy().astype(np.uint8)
            for p, x, y in zip(pred, np.asarray(xs).tolist(), np.asarray(ys).tolist()):
                r, c = y // patcher.step, x // patcher.step
                full[r * size:(r + 1) * size, c * size:(c + 1) * size] = p
    # The mask covers the slide only (whole mask pixels), at exactly dst / src level-0 px per mask pixel.
    scale = patcher.downsample
    h, w = max(1, int(wsi.height / scale)), max(1, int(wsi.width / scale))
    return full[:h, :w], scale


def _whole_slide_mask(wsi, model, mag: float) -> tuple[np.ndarray, float]:
    """One threshold for the whole slide (OtsuSegmenter(whole_slide=True)) instead of one per tile."""
    scale = float(wsi.mag) / mag
    w, h = max(1, round(wsi.width / scale)), max(1, round(wsi.height / scale))
    image = wsi.get_thumbnail((w, h)).resize((w, h))
    return np.asarray(model.eval_transforms(image)).astype(np.uint8), wsi.width / w


def segment_semantic(wsi, segmentation_model, target_mag: int = 10, batch_size: int = 16, device: str = "cuda:0",
                     verbose=False, num_workers=None, collate_fn=None, inference_fn=None, return_contours=False):
    """The class map at the segmentation magnification and its downscale factor (level-0 px per mask px);
    with ``return_contours`` also a GeoDataFrame of each class's polygons (column ``class``)."""
    mask, scale = predict_mask(wsi, segmentation_model, target_mag, batch_size, device, num_workers, verbose,
                               collate_fn, inference_fn)
    if not return_contours:
        return mask, scale
    parts = []
    for value in sorted(int(v) for v in np.unique(mask) if v):
        gdf = mask_to_gdf(mask == value, scale)
        gdf["class"] = value
        parts.append(gdf)
    contours = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True)) if parts else gdf_from_polygons([])
    return mask, scale, contours


def segment_tissue(wsi, segmentation_model, target_mag: float = 10, holes_are_tissue: bool = True,
                   job_dir: str | None = None, batch_size: int = 16, device: str = "cuda:0", verbose=False,
                   num_workers=None, artifact_remover_model=None, provenance: dict | None = None):
    """Segment tissue; return the GeoDataFrame, or the GeoJSON path when ``job_dir`` is given.

    With ``job_dir`` it also writes ``thumbnails/<slide>.jpg`` and the contour overlay
    ``contours/<slide>.jpg``. The contours stay on the slide (``wsi.gdf_contours``) for patching.
    """
    t0 = time.perf_counter()
    mask, scale = predict_mask(wsi, segmentation_model, target_mag, batch_size, device, num_workers, verbose)
    gdf = mask_to_gdf(mask, scale, holes_are_tissue=holes_are_tissue)
    if artifact_remover_model is not None and len(gdf):
        gdf = remove_artifacts(wsi, gdf, artifact_remover_model, batch_size, device, num_workers)
    wsi.gdf_contours = gdf
    wsi.segmentation_seconds = time.perf_counter() - t0
    if job_dir is None:
        return gdf
    save_segmentation_pictures(wsi, gdf, job_dir)
    return save_geojson(gdf, os.path.join(job_dir, "contours_geojson", f"{wsi.name}.geojson"), provenance)


def remove_artifacts(wsi, gdf: gpd.GeoDataFrame, artifact_model, batch_size=16, device="cpu", num_workers=None):
    """Tissue minus the regions the artifact model calls artifacts, on the device it is given."""
    clean, scale = predict_mask(wsi, artifact_model, None, batch_size, device, num_workers)
    clean_gdf = mask_to_gdf(clean, scale, holes_are_tissue=False)
    kept = tissue_union(gdf).intersection(tissue_union(clean_gdf))
    parts = [kept] if kept.geom_type == "Polygon" else [g for g in getattr(kept, "geoms", []) if
                                                          g.geom_type == "Polygon"]
    return gdf_from_polygons([p for p in parts if not p.is_empty])


def save_segmentation_pictures(wsi, gdf: gpd.GeoDataFrame, job_dir: str) -> dict[str, str]:
    thumb = wsi.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    paths = {"thumbnail": save_image(os.path.join(job_dir, "thumbnails", f"{wsi.name}.jpg"), thumb, quality=90)}
    overlay = draw_coords(wsi, np.zeros((0, 2)), 0, THUMBNAIL_SIZE, contours=gdf)
    paths["contours"] = save_image(os.path.join(job_dir, "contours", f"{wsi.name}.jpg"), overlay, quality=90)
    return paths
