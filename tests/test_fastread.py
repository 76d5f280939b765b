"""Reading JPEG tiles straight from the file: OpenSlide's very pixels by default, and the opt-in fast read path
(tiles decoded at the reduced size needed) close to them."""

import numpy as np
import openslide
import pytest
import torch
from conftest import fixture_slide
from PIL import Image
from torchvision.transforms.v2 import functional as F2

import trident_lib as tl
from trident_lib.data import split_to_tensor
from trident_lib.extraction import embed_batches, patch_features, patch_loader
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import patcher_from_coords, tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.synthetic import Ellipse, SlideSpec, write_slide

SLIDE_40X = "synthetic-40x.svs"  # levels at 1x and 4x as Aperio writes them: a 20x patch is a 512-px read


@pytest.fixture(scope="module")
def odd_slides(tmp_path_factory):
    """Sizes that are no multiple of the tiles: edge tiles are partly outside the slide."""
    folder = tmp_path_factory.mktemp("odd")
    tissue = [Ellipse(500, 350, 470, 330)]
    return {"halving": write_slide(str(folder / "halving.svs"), SlideSpec(1000, 700, levels=3, tissue=tissue)),
            "single": write_slide(str(folder / "single.svs"), SlideSpec(1000, 700, levels=1, tissue=tissue))}


@pytest.fixture(scope="module")
def coords_40x():
    with tl.load_wsi(fixture_slide(SLIDE_40X)) as wsi:
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        coords, attrs = tissue_coords(wsi, 20, 256)
    return coords[np.random.default_rng(0).choice(len(coords), 24, replace=False)], attrs


def test_tiles_read_from_the_file_are_openslides_pixels(odd_slides):
    """Real Aperio tiles (RGB, shared JPEG tables, 240 px), tifffile's (YCbCr), edges, regions past the slide."""
    rng = np.random.default_rng(0)
    for path in [fixture_slide("CMU-1-Small-Region.svs"), fixture_slide(SLIDE_40X), *odd_slides.values()]:
        with tl.load_wsi(path) as wsi, openslide.OpenSlide(path) as osr:
            assert wsi._jpeg_tiles() is not None, path
            for level, (w, h) in enumerate(wsi.level_dimensions):
                ds = int(wsi.level_downsamples[level])
                for _ in range(12):
                    x, y = (int(v) for v in rng.integers(-200, (w + 50, h + 50)))
                    size = tuple(int(v) for v in rng.integers(1, 600, 2))
                    mine = wsi.read_region((x * ds, y * ds), level, size, read_as="numpy")
                    theirs = np.asarray(osr.read_region((x * ds, y * ds), level, size).convert("RGB"))
                    np.testing.assert_array_equal(mine, theirs, err_msg=f"{path} level {level} at {(x, y)} {size}")


def test_default_batches_are_bit_identical_to_openslide_pil_and_torchvision(coords_40x):
    coords, attrs = coords_40x
    transform = encoder_factory("efficientnet_lite0").eval_transforms
    with openslide.OpenSlide(fixture_slide(SLIDE_40X)) as osr:
        want = torch.stack([transform(osr.read_region((int(x), int(y)), 0, (512, 512)).convert("RGB")
                                      .resize((256, 256), Image.Resampling.BICUBIC)) for x, y in coords])
    with tl.load_wsi(fixture_slide(SLIDE_40X)) as wsi:
        # in-process, a forked reader sharing the slide's file descriptor, and both resizes in the batch (as
        # on a GPU: trident_lib.resample)
        for workers, on_device in ((0, False), (1, False), (0, True)):
            loader, to_input = patch_loader(wsi, coords, attrs, transform, 8, workers, resize_on_device=on_device)
            batches = [imgs for imgs, _, _ in loader]
            assert batches[0].shape[1:] == ((512, 512, 3) if on_device else (3, 224, 224))
            got = torch.cat([to_input(imgs) for imgs in batches])
            assert torch.equal(got, want)


@pytest.mark.parametrize("slide", [SLIDE_40X, "CMU-1-Small-Region.svs"])
def test_fast_read_patches_are_close_to_the_default(coords_40x, slide):
    """tifffile's YCbCr tiles, and Aperio's RGB ones with shared tables and 240-px tiles (read at 10x)."""
    coords, attrs = coords_40x
    if slide != SLIDE_40X:
        coords = np.array([(x, y) for x in range(0, 2048, 384) for y in range(0, 2560, 512)])
        attrs = {**attrs, "level0_magnification": 20}
    with tl.load_wsi(fixture_slide(slide)) as wsi:
        exact = patcher_from_coords(wsi, coords, attrs)
        fast = patcher_from_coords(wsi, coords, attrs, fast_read=True)
        assert fast.fast_read and fast.read_scale == 2 and exact.read_size == 512
        a = np.stack([exact[i][0] for i in range(len(coords))]).astype(int)
        b = np.stack([fast[i][0] for i in range(len(coords))]).astype(int)
    assert a.shape == b.shape == (len(coords), 256, 256, 3)
    diff = np.abs(a - b)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))


def test_fast_read_features_are_close_to_the_default(coords_40x):
    """resnet50 within cosine 0.999 on every patch. efficientnet_lite0 reacts to pixel-level changes far more
    (random +-1 grey-level noise alone gives cosines near 0.8; Lanczos instead of bicubic, 0.998): the fast path
    keeps it above 0.99 on every patch, 0.997 on average."""
    coords, attrs = coords_40x
    with tl.load_wsi(fixture_slide(SLIDE_40X)) as wsi:
        for name, worst, mean in (("resnet50", 0.999, 0.9995), ("efficientnet_lite0", 0.99, 0.997)):
            torch.manual_seed(0)
            enc = encoder_factory(name, pretrained=name == "efficientnet_lite0")
            exact = patch_features(wsi, enc, coords, attrs, "cpu", 12)
            fast = patch_features(wsi, enc, coords, attrs, "cpu", 12, fast_read=True)
            cos = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
            assert cos.min() >= worst and cos.mean() >= mean, (name, cos.min(), cos.mean())


def test_fast_read_at_the_slide_edge_is_black_beyond_it_like_the_default(odd_slides):
    """A 20x patch of a 40x slide (one 1000 x 700 level) that runs past its right and bottom edges."""
    with tl.load_wsi(odd_slides["single"]) as wsi:
        attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40}
        coords = np.array([[768, 512], [0, 0]])
        exact = patcher_from_coords(wsi, coords, attrs)
        fast = patcher_from_coords(wsi, coords, attrs, fast_read=True)
        assert fast.fast_read and fast.read_scale == 2
        for i in range(len(coords)):
            a, b = exact[i][0].astype(int), fast[i][0].astype(int)
            inside_x, inside_y = (1000 - coords[i][0]) // 2, (700 - coords[i][1]) // 2
            assert not b[inside_y:].any() and not b[:, inside_x:].any()  # black past the edge
            assert not a[inside_y + 2:].any() and not a[:, inside_x + 2:].any()  # bicubic blurs 2 px over it
            inner = np.abs(a[:inside_y - 2, :inside_x - 2] - b[:inside_y - 2, :inside_x - 2])
            assert inner.mean() < 2.0, inner.mean()


def test_fast_read_at_a_level_with_a_fractional_downsample(tmp_path):
    """Aperio's reduced levels are rarely an exact 4x (4102 / 1025): by default OpenSlide reads them (it
    interpolates the sub-pixel offset); the fast path decodes their tiles at whole-pixel positions, close (on
    this noisy texture; a whole pixel off is 14 grey levels on average)."""
    spec = SlideSpec(4102, 3001, levels=2, level_scale=4, tissue=[Ellipse(2051, 1500, 1900, 1400)])
    with tl.load_wsi(write_slide(str(tmp_path / "aperio_like.svs"), spec)) as wsi:
        assert wsi.level_downsamples[1] != 4
        attrs = {"patch_size": 256, "patch_size_level0": 1024, "level0_magnification": 40}
        coords = np.array([(x, y) for x in (1024, 2048) for y in (512, 1536)])
        exact = patcher_from_coords(wsi, coords, attrs)
        fast = patcher_from_coords(wsi, coords, attrs, fast_read=True)
        assert exact.level == fast.level == 1 and fast.fast_read and fast.read_scale == 1
        diff = np.abs(np.stack([exact[i][0] for i in range(4)]).astype(int) -
                      np.stack([fast[i][0] for i in range(4)]).astype(int))
    assert 0 < diff.mean() < 5 and np.percentile(diff, 99) <= 32, diff.mean()  # 0: read by OpenSlide; 1 px off: 14


def test_slides_without_jpeg_tiles_take_the_default_path():
    """A deflate-compressed TIFF: no direct tiles, and fast_read reads and resizes exactly as the default."""
    path = fixture_slide("openslide-boxes.tiff")
    with tl.load_wsi(path, mpp=0.25) as wsi:
        assert wsi._jpeg_tiles() is None and not wsi.can_read_reduced(0)
        attrs = {"patch_size": 64, "patch_size_level0": 128, "level0_magnification": 40}
        coords = np.array([[0, 0], [128, 64], [256, 192]])  # the last two run past the 300 x 250 slide
        assert not patcher_from_coords(wsi, coords, attrs, fast_read=True).fast_read
        enc = encoder_factory("efficientnet_lite0")
        exact = patch_features(wsi, enc, coords, attrs, "cpu", 4)
        fast = patch_features(wsi, enc, coords, attrs, "cpu", 4, fast_read=True)
    np.testing.assert_array_equal(exact, fast)


@pytest.mark.parametrize("incoming, size", [(32, 512), (50, 32), (64, 100), (8, 8), (7, None)])
def test_reader_batches_are_joined_into_model_batches_in_order(incoming, size):
    """Readers' small batches become model batches of ``size`` on the device: every row once, in order, and
    the model sees batches of exactly ``size`` but the last."""
    images = torch.arange(617, dtype=torch.float32).reshape(-1, 1).repeat(1, 3)
    seen = []

    def model(x):
        seen.append(len(x))
        return x * 2

    batches = [(images[i:i + incoming], None) for i in range(0, len(images), incoming)]
    out = embed_batches(model, batches, torch.device("cpu"), batch_size=size)
    assert np.array_equal(out, images.numpy() * 2)
    if size is not None:
        assert all(n == size for n in seen[:-1]) and 0 < seen[-1] <= size


def test_fast_batches_are_the_encoders_steps_on_each_image():
    """The fast path's batch transform (channels-last resize, then one copy to float) gives each image's own
    Resize, CenterCrop, ToTensor and Normalize on tensors, contiguous as a model expects."""
    transform = encoder_factory("efficientnet_lite0").eval_transforms
    per_patch, to_input = split_to_tensor(transform, in_batch=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    got = to_input(torch.stack([per_patch(img) for img in images]))
    resize, crop, _, normalize = transform.transforms
    # torchvision's v2 resize on uint8 (v1's rounds through float: a grey level apart), image by image
    want = torch.cat([normalize(crop(F2.resize(torch.from_numpy(img).permute(2, 0, 1)[None], [resize.size],
                                               resize.interpolation, antialias=True)).float() / 255)
                      for img in images])
    assert got.is_contiguous() and got.shape == (5, 3, 224, 224)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("patch_level0,side", [(1024, 256), (768, 256)])
def test_device_resizes_give_the_cpu_path_bytes_for_large_reads(odd_slides, patch_level0, side):
    """A read 4 or 3 times the patch's side (a 10x or 13.3x patch of a one-level 40x slide): Pillow resizes it
    in the reader (the read would crowd the readers' shared memory), the device does the encoder's steps."""
    transform = encoder_factory("efficientnet_lite0").eval_transforms
    attrs = {"patch_size": side, "patch_size_level0": patch_level0, "level0_magnification": 40}
    coords = np.array([[0, 0], [0, 4], [8, 0]])
    with tl.load_wsi(odd_slides["single"]) as wsi:
        cpu, cpu_input = patch_loader(wsi, coords, attrs, transform, 8, 0)
        dev, dev_input = patch_loader(wsi, coords, attrs, transform, 8, 0, resize_on_device=True)
        [(a, *_)], [(b, *_)] = list(cpu), list(dev)
        assert b.shape == (3, side, side, 3)  # resized in the reader, encoder's steps left
        assert torch.equal(cpu_input(a), dev_input(b))
