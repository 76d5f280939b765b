"""Heatmaps of patch scores (e.g. attention) over a slide, with the top-scoring patches exported."""

from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image

from .io import save_image

MAX_SIDE = 4096  # a visualisation level larger than this is drawn on a thumbnail instead
_COOLWARM = np.array([[59, 76, 192], [124, 159, 249], [192, 212, 245], [242, 203, 183], [238, 132, 104],
                      [180, 4, 38]], np.float32)


def colormap(values: np.ndarray, cmap: str = "coolwarm") -> np.ndarray:
    """(..., 3) uint8 colours for values in [0, 1]: 'coolwarm', or any OpenCV map ('jet', 'viridis', ...)."""
    v = np.clip(values, 0, 1)
    if cmap == "coolwarm":
        pos = v * (len(_COOLWARM) - 1)
        lo = np.floor(pos).astype(int).clip(0, len(_COOLWARM) - 2)
        frac = (pos - lo)[..., None]
        return ((1 - frac) * _COOLWARM[lo] + frac * _COOLWARM[lo + 1]).astype(np.uint8)
    code = getattr(cv2, f"COLORMAP_{cmap.upper()}", None)
    if code is None:
        raise ValueError(f"unknown colormap {cmap!r}; use 'coolwarm' or an OpenCV colormap name such as 'jet'")
    flat = (v.reshape(-1) * 255).astype(np.uint8)[:, None]
    return cv2.applyColorMap(flat, code)[:, 0, ::-1].reshape(*v.shape, 3)


def visualize_heatmap(wsi, scores: np.ndarray, coords: np.ndarray, patch_size_level0: int, vis_level: int | None = 2,
                      cmap: str = "coolwarm", normalize: bool = True, num_top_patches_to_save: int = -1,
                      output_dir: str | None = "output", vis_mag: int | None = None, overlay_only: bool = False,
                      filename: str = "heatmap.png") -> str:
    """Blend per-patch scores over the slide at ``vis_level`` (or ``vis_mag``); save to ``output_dir/filename``.

    With ``num_top_patches_to_save`` > 0 the highest-scoring patches are also saved under ``output_dir/topk``.
    """
    wsi._lazy_initialize()
    scores = np.asarray(scores, np.float32).reshape(-1)
    coords = np.asarray(coords).reshape(-1, 2)
    if len(scores) != len(coords):
        raise ValueError(f"{wsi.name}: {len(scores)} scores for {len(coords)} coordinates")
    if vis_mag is not None:
        level, _ = wsi.get_best_level_and_custom_downsample(wsi.mag / vis_mag, 0.1)
    else:
        level = min(vis_level if vis_level is not None else wsi.level_count - 1, wsi.level_count - 1)
    lw, lh = wsi.level_dimensions[level]
    if max(lw, lh) > MAX_SIDE:
        base = wsi.get_thumbnail((MAX_SIDE, MAX_SIDE))
    else:
        base = wsi.read_region((0, 0), level, (lw, lh))
    sx, sy = base.width / wsi.width, base.height / wsi.height
    if normalize and len(scores):
        lo, hi = float(scores.min()), float(scores.max())
        scores = (scores - lo) / (hi - lo) if hi > lo else np.full_like(scores, 0.5)
    total = np.zeros((base.height, base.width), np.float32)
    count = np.zeros_like(total)
    for s, (x, y) in zip(scores, coords):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int((x + patch_size_level0) * sx)), max(y0 + 1, int((y + patch_size_level0) * sy))
        total[y0:y1, x0:x1] += s
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    heat = np.where(covered, total / np.maximum(count, 1), 0)
    colours = colormap(heat, cmap)
    rgb = np.asarray(base.convert("RGB")).copy()
    if overlay_only:
        out = np.where(covered[..., None], colours, 255).astype(np.uint8)
    else:
        out = rgb
        out[covered] = (0.5 * rgb[covered] + 0.5 * colours[covered]).astype(np.uint8)
    output_dir = os.fspath(output_dir) if output_dir else "."
    path = save_image(os.path.join(output_dir, filename), Image.fromarray(out))
    if num_top_patches_to_save > 0 and len(scores):
        top = np.argsort(-scores)[:num_top_patches_to_save]
        for rank, i in enumerate(top):
            x, y = map(int, coords[i])
            tile = wsi.read_region((x, y), 0, (patch_size_level0, patch_size_level0))
            save_image(os.path.join(output_dir, "topk", f"{rank:03d}_x{x}_y{y}_score{scores[i]:.3f}.png"), tile)
    return path
