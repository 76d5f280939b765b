"""Pillow's resize reproduced in torch (trident_lib.resample): the same bytes, whatever the sizes and filter."""

import numpy as np
import pytest
import torch
from PIL import Image

from trident_lib.resample import pil_resize

SIZES = [((512, 512), (256, 256)), ((256, 256), (224, 224)), ((240, 240), (256, 256)),
         ((700, 1000), (333, 517)), ((300, 200), (300, 100)), ((64, 64), (64, 64))]


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size,out", SIZES)
def test_resize_is_pillows_bit_for_bit(size, out, kind):
    h, w = size
    images = np.random.default_rng(h * w).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    images[1] = images[1] // 64 * 64  # flat areas and sharp steps: the filter's lobes overshoot, clipped
    images[2, :, : w // 2], images[2, :, w // 2:] = 255, 0
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[kind]
    want = np.stack([np.asarray(Image.fromarray(im).resize(out[::-1], resample)) for im in images])
    got = pil_resize(torch.from_numpy(images), out, kind, chunk=2)
    np.testing.assert_array_equal(got.numpy(), want)
