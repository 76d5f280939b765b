import h5py
import numpy as np
import pytest
from shapely.geometry import box

import trident_lib as tl
from trident_lib.contours import gdf_from_polygons, load_geojson, save_geojson
from trident_lib.io import COORDS_ATTRS, read_coords_h5
from trident_lib.patching import WSIPatcher, extract_tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory


def square(x0, y0, x1, y1):
    return gdf_from_polygons([box(x0, y0, x1, y1)])


def expected_cells(width, height, step, ps, sq, threshold):
    """Oracle in plain arithmetic: every grid cell whose overlap with the square passes the rule."""
    out = []
    for y in range(0, height, step):
        for x in range(0, width, step):
            ox = min(x + ps, sq[2]) - max(x, sq[0])
            oy = min(y + ps, sq[3]) - max(y, sq[1])
            if ox >= 0 and oy >= 0 and (ox * oy >= threshold * ps * ps if threshold > 0 else True):
                out.append((x, y))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


# Square tissue at 40x -> 20x / 256 px (level-0 patch 512) and at 20x -> 20x (256).
@pytest.mark.parametrize("slide,sq,overlap,threshold,count", [
    ("aperio_40x", (1000, 1000, 2000, 2000), 0, 0.0, 9),
    ("aperio_40x", (1000, 1000, 2000, 2000), 0, 0.5, 4),
    ("aperio_40x", (1000, 1000, 2000, 2000), 128, 0.0, 36),
    ("aperio_40x", (1000, 1000, 2000, 2000), 128, 0.5, 13),
    ("aperio_20x", (500, 500, 1000, 1000), 0, 0.0, 9),
    ("aperio_20x", (500, 500, 1000, 1000), 0, 0.5, 4),
    ("aperio_20x", (500, 500, 1000, 1000), 64, 0.5, 6),
])
def test_grid_on_known_square(slides, slide, sq, overlap, threshold, count):
    with tl.load_wsi(slides[slide]) as wsi:
        patcher = WSIPatcher(wsi, 256, dst_mag=20, overlap=overlap, mask=square(*sq), threshold=threshold,
                             coords_only=True)
        ps = patcher.patch_size_src
        assert ps == 256 * wsi.mag // 20
        expected = expected_cells(wsi.width, wsi.height, ps - overlap * wsi.mag // 20, ps, sq, threshold)
        assert len(expected) == count
        np.testing.assert_array_equal(patcher.valid_coords, expected)
        assert patcher.valid_coords.dtype == np.int64


def test_grid_exact_cells(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        p = WSIPatcher(wsi, 256, dst_mag=20, mask=square(1000, 1000, 2000, 2000), coords_only=True)
        xs = [512, 1024, 1536]
        assert [tuple(c) for c in p.valid_coords] == [(x, y) for y in xs for x in xs]


def test_grid_size_and_col_major(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:  # 4096 x 3072
        p = WSIPatcher(wsi, 256, dst_mag=20, coords_only=True)
        assert p.get_cols_rows() == (8, 6) and len(p) == 48 and p.patch_size_src == 512
        assert list(p)[:2] == [(0, 0), (512, 0)]
        q = WSIPatcher(wsi, 256, dst_mag=20, coords_only=True, scan_order="col-major")
        assert [tuple(c) for c in q.valid_coords[:2]] == [(0, 0), (0, 512)]
        r = WSIPatcher(wsi, 256, dst_mag=20, overlap=32, coords_only=True)
        assert r.step == 448 and r.get_cols_rows() == (10, 7)


def test_tiles_read_from_best_level_and_resized(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        p = WSIPatcher(wsi, 256, dst_mag=20)
        assert p.level == 1 and p.read_size == 256
        tile, x, y = p.get_tile(2, 1)
        assert (x, y) == (1024, 512) and tile.shape == (256, 256, 3)
        p10 = WSIPatcher(wsi, 224, dst_mag=10, pil=True)  # downsample 4: level 2 exactly
        assert p10.level == 2 and p10.read_size == 224
        p5 = WSIPatcher(wsi, 256, dst_mag=5)  # downsample 8: last level below (4), read 512, resize to 256
        assert p5.level == 2 and p5.read_size == 512 and p5.get_tile(0, 0)[0].shape == (256, 256, 3)


def test_edge_patch_past_slide_is_black(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        tile, _, _ = WSIPatcher(wsi, 256, dst_mag=40).get_tile_xy(4096 - 64, 0)
        assert (tile[:, 64:] == 0).all() and tile[:, :64].mean() > 100


def test_overlap_must_be_smaller_than_patch(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        with pytest.raises(ValueError, match="overlap"):
            WSIPatcher(wsi, 256, dst_mag=20, overlap=256)


def test_measured_mpp_option(slides):
    with tl.load_wsi(slides["odd_mpp"]) as wsi:  # 0.263 um/px, nominal 40x
        nominal = WSIPatcher(wsi, 256, dst_mag=20, coords_only=True)
        measured = WSIPatcher(wsi, 256, dst_mag=20, coords_only=True, use_measured_mpp=True)
        assert nominal.patch_size_src == 512
        assert measured.patch_size_src == round(256 * 0.5 / 0.263) == 487


def test_cmu_coords_contract(tmp_path, cmu_svs):
    seg = segmentation_model_factory("otsu")
    with tl.load_wsi(cmu_svs) as wsi:
        geojson = wsi.segment_tissue(seg, job_dir=str(tmp_path), device="cpu")
        path = wsi.extract_tissue_coords(20, 256, str(tmp_path / "20x_256px_0px_overlap"))
    assert path.endswith("20x_256px_0px_overlap/patches/CMU-1-Small-Region_patches.h5")
    coords, attrs = read_coords_h5(path)
    assert len(coords) == 58  # pinned: TRIDENT 0.3.0's count for the CMU crop, 20x / 256 px / no overlap
    assert set(COORDS_ATTRS) <= set(attrs)
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 256
    assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == 20
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
    with h5py.File(path) as f:
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (58, 2)
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))  # sorted by y, then x
    assert (coords % 256 == 0).all()
    # The GeoJSON can be used again as the mask (as after a hand edit in QuPath).
    again = extract_tissue_coords(tl.load_wsi(cmu_svs), 20, 256, str(tmp_path / "again"), mask=geojson)
    np.testing.assert_array_equal(read_coords_h5(again)[0], coords)
    assert (tmp_path / "thumbnails" / "CMU-1-Small-Region.jpg").exists()
    assert (tmp_path / "contours" / "CMU-1-Small-Region.jpg").exists()


def test_empty_outputs(tmp_path, slides):
    seg = segmentation_model_factory("otsu")
    for name in ("background", "tiny"):
        with tl.load_wsi(slides[name]) as wsi:
            wsi.segment_tissue(seg, device="cpu")
            coords, attrs = read_coords_h5(wsi.extract_tissue_coords(20, 256, str(tmp_path)))
            assert coords.shape == (0, 2) and attrs["name"] == name
    with tl.load_wsi(slides["tiny"]) as wsi:  # smaller than one patch, even with a full mask
        mask = square(0, 0, 300, 200)
        assert len(WSIPatcher(wsi, 256, dst_mag=20, mask=mask, coords_only=True)) == 0


def test_legacy_clam_coords(tmp_path, slides):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.array([[0, 0], [512, 512]]))
        ds.attrs["patch_level"] = 1
        ds.attrs["patch_size"] = 256
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        p = WSIPatcher.from_legacy_coords_file(wsi, str(path))
        assert p.patch_size_src == 512 and p.level == 1 and len(p) == 2
        tile, x, y = next(iter(p))
        assert tile.shape == (256, 256, 3) and (x, y) == (0, 0)


def test_visualize_and_dump(tmp_path, slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        coords_path = wsi.extract_tissue_coords(20, 256, str(tmp_path), mask=square(1000, 1000, 2000, 2000))
        viz = wsi.visualize_coords(coords_path, str(tmp_path / "viz"))
        out = wsi.dump_patches(coords_path, str(tmp_path / "dump"), max_patches=3, image_format="jpg")
    import os
    assert os.path.getsize(viz) > 1000
    files = sorted(os.listdir(out))
    assert len(files) == 3 and files[0].endswith(".jpg")


def test_hand_edited_geojson(tmp_path):
    bowtie = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}}]}
    import json
    p = tmp_path / "edited.geojson"
    p.write_text(json.dumps(bowtie))
    gdf = load_geojson(str(p))
    assert len(gdf) == 2 and gdf.is_valid.all() and abs(gdf.area.sum() - 5000) < 1  # self-intersection repaired
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(ValueError, match="bad.geojson"):
        load_geojson(str(tmp_path / "bad.geojson"))
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    assert len(load_geojson(str(tmp_path / "empty.geojson"))) == 0
    out = save_geojson(gdf, str(tmp_path / "round.geojson"))
    assert len(load_geojson(out)) == 2
