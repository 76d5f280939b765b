"""Pillow's resize (bilinear and bicubic, 8 bits per channel), bit for bit, on a batch of images in torch.

TRIDENT's pixels come from Pillow: the patch is resized with BICUBIC and the encoder's transform resizes
again (torchvision hands PIL images to Pillow). Pillow resamples in two separable passes, each with integer
weights of 22 fractional bits and a rounded, clipped 8-bit result. The same integer arithmetic in torch gives
the same bytes on any device, so a reader can ship the patch as read and leave both resizes to the GPU.
Which pass comes first depends on the sizes and on Pillow's version (13 starts with the vertical one when
the height shrinks much more than the width), so ``pillow_order`` asks the installed Pillow once per size.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit resampling precision
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}  # filter, support


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(index, weight), each (out_size, taps): output pixel j is the sum over t of weight[j, t] * input pixel
    index[j, t], weights in fixed point, computed in Pillow's order of operations (doubles, summed in order,
    normalised, rounded half away from zero). Unused taps have weight 0."""
    filt, support = FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the filter: antialiasing
    support *= filterscale
    inverse = 1.0 / filterscale
    taps = math.ceil(support) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int64)
    for j in range(out_size):
        center = (j + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        w = [filt((x + lo - center + 0.5) * inverse) for x in range(n)]
        total = 0.0
        for v in w:  # a plain running sum, as C's (Python's sum() compensates from 3.12)
            total += v
        for x in range(n):
            v = w[x] / total if total != 0.0 else w[x]
            weight[j, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
        index[j, :n] = np.arange(lo, lo + n)
        index[j, n:] = lo
    used = int(np.flatnonzero((weight != 0).any(0)).max(initial=0)) + 1  # trailing taps unused everywhere
    return index[:, :used], weight[:, :used]


@functools.lru_cache(maxsize=64)
def _on(device: torch.device, in_size: int, out_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    index, weight = coefficients(in_size, out_size, kind)  # on the device once, not per batch
    return (torch.from_numpy(np.ascontiguousarray(index.T)).to(device),
            torch.from_numpy(np.ascontiguousarray(weight.T)).to(device, torch.int32))


def _pass(x: torch.Tensor, dim: int, out_size: int, kind: str) -> torch.Tensor:
    """One pass along ``dim`` of (B, H, W, C) images, uint8 in and out."""
    index, weight = _on(x.device, x.shape[dim], out_size, kind)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = None
    for t in range(len(index)):
        term = x.index_select(dim, index[t]) * weight[t].view(shape)  # uint8 * int32: int32
        acc = term if acc is None else acc.add_(term)
    acc.add_(1 << (PRECISION_BITS - 1))  # round half up, as Pillow starts its sums
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _resize(x: torch.Tensor, size: tuple[int, int], kind: str, vertical_first: bool) -> torch.Tensor:
    passes = [(1, size[0]), (2, size[1])] if vertical_first else [(2, size[1]), (1, size[0])]
    for dim, n in passes:
        if x.shape[dim] != n:
            x = _pass(x, dim, n, kind)
    return x


@functools.lru_cache(maxsize=64)
def pillow_order(in_hw: tuple[int, int], out_hw: tuple[int, int], kind: str) -> bool | None:
    """Whether the installed Pillow resizes in_hw to out_hw vertical pass first (True) or horizontal first
    (False), found by resizing one random image both ways; None if neither gives Pillow's bytes."""
    image = np.random.default_rng(0).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    want = torch.from_numpy(np.asarray(Image.fromarray(image).resize(out_hw[::-1], PIL_FILTERS[kind])).copy())
    for vertical_first in (False, True):
        if torch.equal(_resize(torch.from_numpy(image)[None], out_hw, kind, vertical_first)[0], want):
            return vertical_first
    return None


def pil_resize(batch: torch.Tensor, size: tuple[int, int], kind: str = "bicubic") -> torch.Tensor:
    """(B, H, W, C) uint8 images resized to size = (height, width) exactly as Pillow's ``Image.resize``.
    Raises ValueError for sizes where this Pillow's bytes cannot be reproduced (check with pillow_order)."""
    h, w = size
    if tuple(batch.shape[1:3]) == (h, w):
        return batch  # Pillow copies an image already at that size
    vertical_first = pillow_order(tuple(batch.shape[1:3]), (h, w), kind)
    if vertical_first is None:
        raise ValueError(f"Pillow's {kind} resize from {tuple(batch.shape[1:3])} to {size} is not reproduced here")
    chunk = 128 if batch.device.type == "cuda" else 16  # int32 temporaries, a few hundred MB at most
    out = torch.empty((len(batch), h, w, *batch.shape[3:]), dtype=torch.uint8, device=batch.device)
    for i in range(0, len(batch), chunk):
        out[i:i + chunk] = _resize(batch[i:i + chunk], size, kind, vertical_first)
    return out
