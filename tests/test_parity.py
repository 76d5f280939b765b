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
