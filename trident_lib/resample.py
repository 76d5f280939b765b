"""Pillow's resize (bilinear and bicubic, 8 bits per channel), bit for bit, on a batch of images in torch.

TRIDENT's pixels come from Pillow: the patch is resized with BICUBIC and the encoder's transform resizes
again (torchvision hands PIL images to Pillow). Pillow resamples in two separable passes (horizontal, then
vertical), each with integer weights of 22 fractional bits and a rounded, clipped 8-bit result. The same
integer arithmetic in torch gives the same bytes on any device, so a reader can ship the patch as read and
leave both resizes to the GPU, where they cost almost nothing.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit resampling precision


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
    index[j, t], weights in fixed point, computed as Pillow computes them (doubles, normalised, then rounded
    half away from zero). Unused taps have weight 0."""
    filt, support = FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the filter: antialiasing
    support *= filterscale
    taps = math.ceil(support) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int64)
    for j in range(out_size):
        center = (j + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        w = [filt((x + lo - center + 0.5) / filterscale) for x in range(n)]
        total = sum(w)
        for x in range(n):
            v = w[x] / total if total != 0.0 else w[x]
            weight[j, x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
        index[j, :n] = np.arange(lo, lo + n)
        index[j, n:] = lo
    used = int(np.flatnonzero((weight != 0).any(0)).max(initial=0)) + 1  # trailing taps unused everywhere
    return index[:, :used], weight[:, :used]


def _pass(x: torch.Tensor, dim: int, out_size: int, kind: str) -> torch.Tensor:
    index, weight = coefficients(x.shape[dim], out_size, kind)
    index, weight = torch.from_numpy(index).to(x.device), torch.from_numpy(weight).to(x.device, torch.int32)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = None
    for t in range(index.shape[1]):
        term = x.index_select(dim, index[:, t]) * weight[:, t].view(shape)  # uint8 * int32: int32
        acc = term if acc is None else acc.add_(term)
    acc.add_(1 << (PRECISION_BITS - 1))  # round half up, as Pillow starts its sums
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def pil_resize(batch: torch.Tensor, size: tuple[int, int], kind: str = "bicubic", chunk: int = 32) -> torch.Tensor:
    """(B, H, W, C) uint8 images resized to size = (height, width) exactly as Pillow's ``Image.resize``;
    ``chunk`` images at a time (int32 temporaries)."""
    h, w = size
    if tuple(batch.shape[1:3]) == (h, w):
        return batch  # Pillow copies an image already at that size
    out = torch.empty((len(batch), h, w, *batch.shape[3:]), dtype=torch.uint8, device=batch.device)
    for i in range(0, len(batch), chunk):
        x = batch[i:i + chunk]
        if x.shape[2] != w:  # horizontal first, as Pillow
            x = _pass(x, 2, w, kind)
        if x.shape[1] != h:
            x = _pass(x, 1, h, kind)
        out[i:i + chunk] = x
    return out
