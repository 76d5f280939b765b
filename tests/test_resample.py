"""Pillow's resize reproduced in torch (trident_lib.resample): the same bytes, whatever the sizes and filter."""

import numpy as np
import pytest
import torch
from PIL import Image

from trident_lib.data import _resized
from trident_lib.resample import pil_resize

# (in, out) as (height, width); Pillow 13 takes the vertical pass first where the height shrinks much more
SIZES = [((512, 512), (256, 256)), ((256, 256), (224, 224)), ((240, 240), (256, 256)),
         ((700, 1000), (333, 517)), ((300, 200), (300, 100)), ((64, 64), (64, 64)),
         ((300, 200), (100, 150)), ((50, 7), (1, 1)), ((256, 256), (112, 224)), ((300, 200), (250, 100))]


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size,out", SIZES)
def test_resize_is_pillows_bit_for_bit(size, out, kind):
    h, w = size
    images = np.random.default_rng(h * w).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    images[1] = images[1] // 64 * 64  # flat areas and sharp steps: the filter's lobes overshoot, clipped
    images[2, :, : w // 2], images[2, :, w // 2:] = 255, 0
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[kind]
    want = np.stack([np.asarray(Image.fromarray(im).resize(out[::-1], resample)) for im in images])
    got = pil_resize(torch.from_numpy(images), out, kind)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("hw,size", [((256, 256), 224), ((300, 200), 100), ((200, 301), 150), ((256, 256), (112, 224))])
def test_resize_steps_size_as_torchvision(hw, size):
    from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

    want = _compute_resized_output_size(hw, [size] if isinstance(size, int) else list(size))
    assert _resized(hw, size) == tuple(want)
