import json

import numpy as np
import pytest

import trident_lib as tl
from trident_lib.errors import WeightsNotFoundError
from trident_lib.segmentation_models import apply_otsu_thresholding, segmentation_model_factory


def test_otsu_tile_rules():
    tile = np.full((512, 512, 3), 240, np.uint8)
    assert apply_otsu_thresholding(tile).sum() == 0  # background only
    tile[100:300, 100:300] = (200, 120, 170)  # pink tissue
    tile[0:50, 0:50] = 0  # outside the slide (black) is background
    tile[400:450, 400:450] = (40, 40, 40)  # dark artefact is background
    mask = apply_otsu_thresholding(tile)
    assert mask[150:250, 150:250].all() and mask[:50, :50].sum() == 0 and mask[400:450, 400:450].sum() == 0
    tile[190:210, 190:210] = 240  # a small hole is filled
    assert apply_otsu_thresholding(tile)[200, 200] == 1


def test_otsu_on_synthetic_geometry(slides):
    seg = segmentation_model_factory("otsu")
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        gdf = wsi.segment_tissue(seg, device="cpu")
    grow = 16  # TRIDENT's outlines lie half a 1.25x mask pixel (32 level-0 px at 40x) outside the tissue
    expected = np.pi * (900 + grow) * (700 + grow) + np.pi * (600 + grow) * (500 + grow)
    assert len(gdf) == 2 and abs(gdf.area.sum() - expected) / expected < 0.03
    with tl.load_wsi(slides["with_holes"]) as wsi:
        with_holes = wsi.segment_tissue(seg, device="cpu", holes_are_tissue=False)
        filled = wsi.segment_tissue(seg, device="cpu", holes_are_tissue=True)
    ring = np.pi * (2800**2 - 1400**2)
    assert abs(with_holes.area.sum() - ring) / ring < 0.03
    assert len(with_holes.geometry[0].interiors) == 1 and len(filled.geometry[0].interiors) == 0


def test_geojson_contract(tmp_path, slides):
    seg = segmentation_model_factory("otsu")
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        path = wsi.segment_tissue(seg, device="cpu", job_dir=str(tmp_path))
    doc = json.load(open(path))
    assert doc["type"] == "FeatureCollection"
    assert [f["properties"]["tissue_id"] for f in doc["features"]] == [0, 1]
    assert all(f["geometry"]["type"] == "Polygon" for f in doc["features"])
    xs = [pt[0] for f in doc["features"] for pt in f["geometry"]["coordinates"][0]]
    assert 500 < min(xs) and max(xs) < 4000  # level-0 pixels


@pytest.mark.parametrize("name", ["hest", "grandqc", "grandqc_artifact"])
def test_deep_segmenters_offline_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        segmentation_model_factory(name)
    assert name in str(err.value) and "weights_path" in str(err.value) and "hub cache" in str(err.value)


@pytest.mark.parametrize("name", ["hest", "grandqc", "grandqc_artifact"])
def test_deep_segmenters_load_local_weights(name, tmp_path):
    import torch
    from trident_lib.segmentation_models import SEGMENTERS

    cls = SEGMENTERS[name]
    model, _ = cls.__new__(cls), None
    torch.nn.Module.__init__(model)
    # Build the bare architecture, save its random weights, and load them back through weights_path.
    arch = {"hest": lambda: __import__("torchvision").models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=2, aux_loss=False)}
    import segmentation_models_pytorch as smp
    arch["grandqc"] = lambda: smp.UnetPlusPlus(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=2)
    arch["grandqc_artifact"] = lambda: smp.Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=8)
    net = arch[name]()
    ckpt = tmp_path / "w.pth"
    torch.save(net.state_dict(), ckpt)
    seg = segmentation_model_factory(name, weights_path=str(ckpt))
    x = torch.rand(1, 3, 128, 128)
    out = seg(x)
    assert out.shape == (1, 128, 128) and out.dtype == torch.uint8
    assert seg.weights_sha256 and len(seg.weights_sha256) == 64


def test_unknown_segmenter():
    with pytest.raises(ValueError, match="otsu"):
        segmentation_model_factory("nope")


def test_segment_semantic_and_whole_slide_otsu(slides):
    per_tile = segmentation_model_factory("otsu")
    whole = segmentation_model_factory("otsu", whole_slide=True)
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        mask, scale, contours = wsi.segment_semantic(per_tile, device="cpu", return_contours=True)
        assert scale == 32 and mask.shape == (96, 128) and set(np.unique(mask)) == {0, 1}
        assert list(contours["class"].unique()) == [1] and len(contours) == 2
        gdf_whole = wsi.segment_tissue(whole, device="cpu")
        gdf_tiles = wsi.segment_tissue(per_tile, device="cpu")
    grow = 16  # half a 1.25x mask pixel, as in test_otsu_on_synthetic_geometry
    expected = np.pi * (900 + grow) * (700 + grow) + np.pi * (600 + grow) * (500 + grow)
    assert abs(gdf_whole.area.sum() - expected) / expected < 0.05
    assert abs(gdf_whole.area.sum() - gdf_tiles.area.sum()) / expected < 0.05


def test_segment_semantic_custom_inference(slides):
    import torch

    seg = segmentation_model_factory("otsu")
    calls = []

    def inference_fn(model, batch, device):
        calls.append(1)
        imgs, _ = batch
        return torch.ones(imgs.shape[0], 512, 512, dtype=torch.uint8) * 2  # everything is class 2

    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        mask, _ = wsi.segment_semantic(seg, device="cpu", inference_fn=inference_fn)
    assert calls and (mask == 2).all()
