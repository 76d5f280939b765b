"""Parity with files that TRIDENT 0.3.0 itself wrote (tests/fixtures/golden, provenance in fixtures/README.md)."""

import re

import h5py
import numpy as np
import pytest
import shapely

import trident_lib as tl
from trident_lib.contours import load_geojson
from trident_lib.segmentation_models import segmentation_model_factory

from conftest import GOLDEN, fixture_slide

GOLDEN_COORDS = sorted(GOLDEN.glob("*/*.patches.h5"))
SETTING = re.compile(r"\.(?P<mag>[\d.]+)x_(?P<ps>\d+)px_(?P<ov>\d+)px_overlap(?:\.min_tissue_(?P<t>[\d.]+))?\.patches")


def _setting(path):
    m = SETTING.search(path.name)
    return float(m["mag"]), int(m["ps"]), int(m["ov"]), float(m["t"] or 0)


@pytest.mark.parametrize("golden", GOLDEN_COORDS, ids=[p.name.replace(".patches.h5", "") for p in GOLDEN_COORDS])
def test_coords_from_tridents_geojson_are_identical(tmp_path, golden):
    slide = golden.parent.name
    mag, ps, ov, threshold = _setting(golden)
    mag = int(mag) if mag.is_integer() else mag
    with tl.load_wsi(fixture_slide(f"{slide}.svs"), tissue_seg_path=GOLDEN / slide / f"{slide}.otsu.geojson") as wsi:
        path = wsi.extract_tissue_coords(mag, ps, tmp_path, overlap=ov, min_tissue_proportion=threshold)
    with h5py.File(golden) as want, h5py.File(path) as got:
        assert got["coords"].dtype == want["coords"].dtype
        np.testing.assert_array_equal(got["coords"][:], want["coords"][:])
        for key, value in want["coords"].attrs.items():
            if key == "savetodir":
                continue
            mine = got["coords"].attrs[key]
            assert mine == value and type(mine) is type(value), (key, mine, value)


@pytest.mark.parametrize("slide", sorted(p.name for p in GOLDEN.iterdir()))
def test_otsu_polygons_match_tridents(slide):
    want = load_geojson(str(GOLDEN / slide / f"{slide}.otsu.geojson"))
    with tl.load_wsi(fixture_slide(f"{slide}.svs")) as wsi:
        got = wsi.segment_tissue(segmentation_model_factory("otsu"), target_mag=1.25, holes_are_tissue=True,
                                 batch_size=64, device="cpu")
    a, b = shapely.union_all(got.geometry.values), shapely.union_all(want.geometry.values)
    iou = a.intersection(b).area / a.union(b).area
    assert len(got) == len(want) and iou >= 0.99, (len(got), len(want), iou)


def test_resnet50_features_at_20x_from_a_40x_slide_equal_a_plain_reference(tmp_path):
    """The resize path (a 512-px level-0 read, bicubic down to 256) against features computed with nothing
    of ours: OpenSlide, PIL's bicubic resize, torchvision transforms and a timm ResNet-50 cut after layer 3."""
    import openslide
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms

    from trident_lib.io import read_coords_h5, read_features_h5, save_coords_h5
    from trident_lib.patch_encoder_models import encoder_factory

    torch.manual_seed(0)
    encoder = encoder_factory("resnet50", pretrained=False)
    slide = fixture_slide("synthetic-40x.svs")
    coords, attrs = read_coords_h5(GOLDEN / "synthetic-40x" / "synthetic-40x.20x_256px_0px_overlap.patches.h5")
    coords = coords[[0, len(coords) // 2, len(coords) - 1]]  # first, middle, last patch: enough, and fast
    few = save_coords_h5(tmp_path / "few.h5", coords, attrs)
    with tl.load_wsi(slide) as wsi:
        path = wsi.extract_patch_features(encoder, few, str(tmp_path), device="cpu")
    feats, _, _ = read_features_h5(path)

    reference = timm.create_model("resnet50", pretrained=False, num_classes=0)
    trunk = {k.removeprefix("model.net."): v for k, v in encoder.state_dict().items()}
    missing, unexpected = reference.load_state_dict(trunk, strict=False)
    assert not unexpected and all(k.startswith("layer4") for k in missing)
    reference.eval()
    prep = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BILINEAR),
                               transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with openslide.OpenSlide(slide) as osr:
        tiles = [osr.read_region((int(x), int(y)), 0, (512, 512)).convert("RGB")
                 .resize((256, 256), Image.Resampling.BICUBIC) for x, y in coords]
    with torch.inference_mode():
        x = reference.maxpool(reference.act1(reference.bn1(reference.conv1(torch.stack([prep(t) for t in tiles])))))
        want = reference.layer3(reference.layer2(reference.layer1(x))).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)
