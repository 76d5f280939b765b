import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import trident_lib as tl
from trident_lib.errors import (MissingDependencyError, MissingMPPError, SlideReadError, SlideTooLargeError,
                                UnsupportedFormatError)
from trident_lib.mpp import mag_from_mpp, mpp_from_properties

from conftest import fixture_slide


def test_cmu_svs_reads_as_20x(cmu_svs):
    with tl.load_wsi(cmu_svs) as wsi:
        assert isinstance(wsi, tl.OpenSlideWSI)
        assert wsi.mpp == 0.499 and wsi.mag == 20
        assert wsi.dimensions == (2220, 2967) == wsi.get_dimensions()
        assert wsi.name == "CMU-1-Small-Region"
        region = wsi.read_region((1000, 1000), 0, (64, 32), read_as="numpy")
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        assert isinstance(wsi.read_region((0, 0), 0, (8, 8)), Image.Image)
        thumb = wsi.get_thumbnail((256, 256))
        assert thumb.mode == "RGB" and max(thumb.size) == 256


@pytest.mark.parametrize("name,reader,mpp,mag,levels", [
    ("CMU-1-Small-Region.ome.tif", tl.OpenSlideWSI, 0.499, 20, 1),  # mpp from the OME-XML
    ("CMU-1-Small-Region.ome.zarr", tl.OMEZarrWSI, 0.499, 20, 3),
    ("tileregion.czi", tl.CZIWSI, 0.4, 20, 2),
    ("camelyon16-lowres.dcm", tl.OpenSlideWSI, 28.969, round(10 / 28.969, 4), 1),
    ("openslide-boxes-dicom", tl.OpenSlideWSI, 0.499, 20, 1),
    ("openslide-boxes-dicom/boxes_0.dcm", tl.OpenSlideWSI, 0.499, 20, 1),
    ("openslide-boxes.tiff", tl.OpenSlideWSI, 352.7778, round(10 / 352.7778, 4), 4),
    ("openslide-small.svs", tl.OpenSlideWSI, 0.499, 20, 1),
])
def test_real_formats(derived_slides, name, reader, mpp, mag, levels):
    with tl.load_wsi(derived_slides.get(name) or fixture_slide(name)) as wsi:
        assert type(wsi) is reader
        assert wsi.mpp == mpp and wsi.mag == mag and wsi.level_count == levels
        w, h = wsi.dimensions
        region = wsi.read_region((0, 0), wsi.level_count - 1, (16, 16), read_as="numpy")
        assert region.shape == (16, 16, 3) and region.dtype == np.uint8


def test_omezarr_matches_svs_pixels(cmu_svs, derived_slides):
    with tl.load_wsi(cmu_svs) as a, tl.load_wsi(derived_slides["CMU-1-Small-Region.ome.zarr"]) as b:
        ra = a.read_region((500, 700), 0, (128, 128), read_as="numpy").astype(int)
        rb = b.read_region((500, 700), 0, (128, 128), read_as="numpy").astype(int)
        assert np.abs(ra - rb).mean() < 3  # same pixels, re-encoded


def test_czi_gray16_becomes_8bit_rgb_at_origin(derived_slides):
    with tl.load_wsi(derived_slides["tileregion.czi"]) as wsi:
        assert wsi.dimensions == (1480, 570)
        region = wsi.read_region((0, 0), 0, (1480, 570), read_as="numpy")
        assert region.dtype == np.uint8 and region.shape == (570, 1480, 3)
        assert (region[..., 0] == region[..., 1]).all()  # grey replicated
        assert region.max() > 200  # 16-bit data scaled to the 8-bit range, not clipped


def test_mpp_key_order_and_fallbacks():
    assert mpp_from_properties({"aperio.MPP": "0.2525", "openslide.mpp-x": "0.5"}) == 0.5
    assert mpp_from_properties({"openslide.mpp-x": "n/a", "aperio.MPP": "0.25251"}) == 0.2525
    assert mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == 0.25
    assert mpp_from_properties({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}) == 0.25
    assert mpp_from_properties({"my.mpp": "0.3"}, custom_mpp_keys=["my.mpp"]) == 0.3
    assert mpp_from_properties({}) is None


@pytest.mark.parametrize("mpp,mag", [(0.12, 80), (0.18, 60), (0.25, 40), (0.263, 40), (0.499, 20), (1.0, 10),
                                     (2.0, 5), (4.0, 2.5)])
def test_magnification_buckets(mpp, mag):
    assert mag_from_mpp(mpp) == mag


def test_synthetic_variants(slides):
    expect = {"aperio_40x": (0.25, 40), "aperio_20x": (0.5, 20), "odd_mpp": (0.263, 40),
              "resolution_tags": (0.25, 40), "single_level": (0.25, 40)}
    for name, (mpp, mag) in expect.items():
        with tl.load_wsi(slides[name]) as wsi:
            assert (wsi.mpp, wsi.mag) == (mpp, mag), name
    assert tl.load_wsi(slides["single_level"]).level_count == 1
    assert tl.load_wsi(slides["aperio_40x"]).level_count == 3


def test_no_mpp_is_a_clear_error_and_override_works(slides):
    with pytest.raises(MissingMPPError) as err:
        tl.load_wsi(slides["no_mpp"])
    assert "no_mpp" in str(err.value) and "mpp" in str(err.value) and "custom_list_of_wsis" in str(err.value)
    with tl.load_wsi(slides["no_mpp"], mpp=0.5) as wsi:
        assert wsi.mpp == 0.5 and wsi.mag == 20


def test_best_level(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        assert wsi.get_best_level_and_custom_downsample(2.0) == (1, 1.0)
        assert wsi.get_best_level_and_custom_downsample(3.0) == (1, 1.5)
        assert wsi.get_best_level_and_custom_downsample(16.0) == (2, 4.0)
        assert wsi.get_best_level_and_custom_downsample(1.0) == (0, 1.0)


def test_lazy_init_and_release(slides):
    wsi = tl.load_wsi(slides["aperio_40x"], lazy_init=True)
    assert "not opened" in repr(wsi)
    assert wsi.dimensions == (4096, 3072)  # opens on first use
    wsi.release()
    assert wsi.read_region((0, 0), 0, (4, 4), read_as="numpy").shape == (4, 4, 3)  # re-opens


def test_image_reader_needs_mpp(tmp_path):
    path = tmp_path / "crop.png"
    Image.new("RGB", (300, 200), (200, 100, 150)).save(path)
    with pytest.raises(MissingMPPError, match="crop.png"):
        tl.load_wsi(str(path))
    with tl.load_wsi(str(path), mpp=0.5) as wsi:
        assert type(wsi) is tl.ImageWSI and wsi.mag == 20 and wsi.dimensions == (300, 200)
        region = wsi.read_region((280, 190), 0, (40, 20), read_as="numpy")
        assert (region[:10, :20] == (200, 100, 150)).all() and (region[15:, 30:] == 0).all()  # black past edge


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_image_too_large_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(200_000, 200_000))
    with pytest.raises(SlideTooLargeError, match="huge.png.*200000 x 200000"):
        tl.load_wsi(str(path), mpp=0.25)


@pytest.mark.parametrize("content", [b"", b"this is not a slide\n" * 10, "png"])
def test_not_a_slide(tmp_path, content):
    path = tmp_path / "fake.svs"
    if content == "png":
        Image.new("RGB", (10, 10)).save(path, format="PNG")
    else:
        path.write_bytes(content)
    with pytest.raises(SlideReadError) as err:
        tl.load_wsi(str(path))
    assert "fake.svs" in str(err.value) and "openslide" in str(err.value)


def test_truncated_slide(tmp_path, cmu_svs):
    data = open(cmu_svs, "rb").read()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match="truncated.svs"):
        wsi = tl.load_wsi(str(path))
        wsi.read_region((0, 0), 0, (2220, 2967))  # if the header survived, the pixel read must fail cleanly


@pytest.mark.parametrize("ext", [".vsi", ".qptiff", ""])
def test_unsupported_format_lists_supported(tmp_path, ext):
    path = tmp_path / f"slide{ext}"
    path.write_bytes(b"x")
    with pytest.raises(UnsupportedFormatError) as err:
        tl.load_wsi(str(path))
    assert str(path) in str(err.value) and ".svs" in str(err.value) and ".czi" in str(err.value)


@pytest.mark.parametrize("reader,package", [("cucim", "cucim"), ("sdpc", "sdpc")])
def test_optional_readers_name_their_package(cmu_svs, reader, package):
    with pytest.raises(MissingDependencyError, match=package):
        tl.load_wsi(cmu_svs, reader_type=reader)


def test_unknown_reader_type(cmu_svs):
    with pytest.raises(ValueError, match="openslide"):
        tl.load_wsi(cmu_svs, reader_type="nope")
