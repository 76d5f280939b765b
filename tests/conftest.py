from pathlib import Path

import numpy as np
import pytest

from trident_lib.synthetic import write_standard_slides

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # small real files with their provenance (fixtures/README.md)
GOLDEN = FIXTURES / "golden" / "trident-0.3.0"


def fixture_slide(name: str) -> str:
    path = FIXTURES / "slides" / name
    assert path.exists(), f"test slide missing from the repository: {path}"
    return str(path)


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    """Synthetic slides with known geometry (see trident_lib.synthetic.standard_specs)."""
    return write_standard_slides(str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture(scope="session")
def cmu_svs():
    return fixture_slide("CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def derived_slides(tmp_path_factory, cmu_svs):
    """Formats written here rather than committed: the CMU pixels as pyramidal OME-TIFF and OME-Zarr, and a
    16-bit grey CZI whose origin is not at (0, 0)."""
    import openslide

    folder = tmp_path_factory.mktemp("derived")
    with openslide.OpenSlide(cmu_svs) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    levels = [rgb, rgb[::2, ::2], rgb[::4, ::4]]
    return {"CMU-1-Small-Region.ome.tif": _write_ome_tiff(folder / "CMU-1-Small-Region.ome.tif", levels, 0.499),
            "CMU-1-Small-Region.ome.zarr": _write_ome_zarr(folder / "CMU-1-Small-Region.ome.zarr", levels, 0.499),
            "tileregion.czi": _write_czi(folder / "tileregion.czi", 1480, 570, 0.4)}


def _write_ome_tiff(path, levels, mpp) -> str:
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        opts = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
        tif.write(levels[0], subifds=len(levels) - 1, metadata={"axes": "YXS", "PhysicalSizeX": mpp,
                                                                "PhysicalSizeY": mpp}, **opts)
        for level in levels[1:]:  # reduced resolutions as SubIFDs: OpenSlide sees only level 0
            tif.write(level, subfiletype=1, **opts)
    return str(path)


def _write_ome_zarr(path, levels, mpp) -> str:
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for i, level in enumerate(levels):
        group.create_array(f"s{i}", data=np.moveaxis(level, 2, 0), chunks=(3, 512, 512))
        s = mpp * 2 ** i
        datasets.append({"path": f"s{i}", "coordinateTransformations": [{"type": "scale", "scale": [1.0, s, s]}]})
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    return str(path)


def _write_czi(path, width, height, mpp) -> str:
    from pylibCZIrw import czi as pyczi

    ramp = (np.arange(width * height, dtype=np.uint32) * 7 % 65536).astype(np.uint16).reshape(height, width, 1)
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        czi.write(ramp, plane={"C": 0, "Z": 0, "T": 0}, location=(100, -50))
        czi.write_metadata(document_name="tileregion", channel_names={0: "grey"}, scale_x=mpp * 1e-6,
                           scale_y=mpp * 1e-6)
    return str(path)
