import numpy as np
import pytest
from PIL import Image

import trident_lib as tl


def test_converter_writes_pyramid_with_right_mpp(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(np.full((600, 500, 3), 128, np.uint8)).save(src / "b.jpg")
    (tmp_path / "mpp.csv").write_text("wsi,mpp\na.png,0.25\nb.jpg,0.5\n")
    conv = tl.AnyToTiffConverter(str(tmp_path / "out"))
    paths = conv.process_all(str(src), str(tmp_path / "mpp.csv"), downscale_by=2, num_workers=2)
    with tl.load_wsi(paths[0]) as wsi:
        assert isinstance(wsi, tl.OpenSlideWSI)
        assert wsi.dimensions == (800, 600) and wsi.mpp == 0.5 and wsi.mag == 20  # 0.25 x 2
        assert wsi.level_count >= 2
    with tl.load_wsi(paths[1]) as wsi:
        assert wsi.mpp == 1.0 and wsi.mag == 10


def test_converter_errors(tmp_path):
    (tmp_path / "mpp.csv").write_text("wsi\nmissing.png\n")
    with pytest.raises(ValueError, match="mpp"):
        tl.AnyToTiffConverter(str(tmp_path)).process_all(str(tmp_path), str(tmp_path / "mpp.csv"))
    (tmp_path / "mpp2.csv").write_text("wsi,mpp\nmissing.png,0.5\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tl.AnyToTiffConverter(str(tmp_path)).process_all(str(tmp_path), str(tmp_path / "mpp2.csv"))
