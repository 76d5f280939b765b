"""Bad input, faults and hostile input (issue: robustness). Each case asserts its outcome."""

import errno
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pytest
import tifffile

import trident_lib as tl
from trident_assets.assets import Inbox
from trident_assets.definitions import build_definitions
from trident_assets.inbox import redact
from trident_assets.settings import PatchEncoderConfig, Settings, SlideEncoderConfig
from trident_lib.errors import SlideReadError
from trident_lib.extraction import patch_features
from trident_lib.io import save_features_h5
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.weights import load_state_dict

from conftest import fixture_slide

COORDS = "20x_256px_0px_overlap"
FEATS = "features_efficientnet_lite0"


def make_settings(tmp_path) -> Settings:
    return Settings(inbox=str(tmp_path / "inbox"), storage=str(tmp_path / "out"),
                    patch_encoders=(PatchEncoderConfig("efficientnet_lite0", batch_size=16),),
                    slide_encoders=(SlideEncoderConfig("mean-efficientnet_lite0"),))


def run_slide(defs, instance, key, **kw):
    instance.add_dynamic_partitions("slides", [key])
    return defs.resolve_job_def("process_slides").execute_in_process(partition_key=key, instance=instance,
                                                                     raise_on_error=False, **kw)


def failure_message(result) -> str:
    return "\n".join(e.event_specific_data.error.message for e in result.all_events
                     if e.event_type_value == "STEP_FAILURE")


def checks(result) -> dict:
    return {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"}


@pytest.fixture()
def platform(tmp_path):
    (tmp_path / "inbox").mkdir()
    settings = make_settings(tmp_path)
    with dg.instance_for_test() as instance:
        yield settings, build_definitions(settings), instance, Path(settings.inbox), Path(settings.storage)


# -- 1, 2, 5: not a slide, truncated, unsupported format --------------------------------------------------

@pytest.mark.parametrize("name,content,expect", [
    ("empty.svs", b"", "cannot be read by the openslide reader"),
    ("text.svs", b"hello\n" * 100, "cannot be read by the openslide reader"),
    ("scan.vsi", b"x" * 100, "no reader supports"),
    ("scan.qptiff", b"x" * 100, "no reader supports"),
])
def test_bad_files_fail_clearly_and_leave_nothing(platform, name, content, expect):
    settings, defs, instance, inbox, out = platform
    (inbox / name).write_bytes(content)
    result = run_slide(defs, instance, name)
    msg = failure_message(result)
    assert not result.success and name in msg and expect in msg
    if "no reader" in expect:
        assert ".svs" in msg and ".czi" in msg  # lists what is supported
    assert not any(p.suffix in (".geojson", ".h5") for p in out.rglob("*"))
    assert not list(out.rglob("*.tmp"))


def test_truncated_slide_in_a_batch_does_not_stop_the_others(platform, slides):
    settings, defs, instance, inbox, out = platform
    data = Path(slides["aperio_40x"]).read_bytes()
    (inbox / "cut.svs").write_bytes(data[: len(data) // 3])
    shutil.copy(slides["aperio_20x"], inbox / "good.svs")
    instance.add_dynamic_partitions("slides", ["cut.svs", "good.svs"])
    tags = {"dagster/asset_partition_range_start": "cut.svs", "dagster/asset_partition_range_end": "good.svs"}
    result = defs.resolve_job_def("process_slides").execute_in_process(instance=instance, tags=tags)
    assert result.success
    failing = checks(result)["tissue_found"].metadata["failing"].value
    assert "cut.svs" in failing and "cut.svs" in failing["cut.svs"] and "good.svs" not in failing
    assert (out / COORDS / FEATS / "good.svs.h5").exists()


def test_slide_broken_before_its_features_fails_alone_in_a_batch(platform, slides):
    """The features step reads its slides through one set of readers: one that no longer opens fails with its
    name, and the others' features are those they got before, bit for bit."""
    settings, defs, instance, inbox, out = platform
    for name, slide in (("a.svs", "aperio_20x"), ("b.svs", "aperio_40x"), ("c.svs", "aperio_40x")):
        shutil.copy(slides[slide], inbox / name)
    instance.add_dynamic_partitions("slides", ["a.svs", "b.svs", "c.svs"])
    tags = {"dagster/asset_partition_range_start": "a.svs", "dagster/asset_partition_range_end": "c.svs"}
    job = defs.resolve_job_def("process_slides")
    assert job.execute_in_process(instance=instance, tags=tags).success

    def features(name):
        with h5py.File(out / COORDS / FEATS / f"{name}.h5") as f:
            return f["features"][:]

    before = {name: features(name) for name in ("a.svs", "c.svs")}
    (inbox / "b.svs").write_bytes(b"not a slide any more")
    result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False,
                                    asset_selection=[dg.AssetKey(["patch_features", "efficientnet_lite0"])])
    failing = checks(result)["features_valid"].metadata["failing"].value
    assert list(failing) == ["b.svs"] and "b.svs" in failing["b.svs"] and "cannot be read" in failing["b.svs"]
    for name, want in before.items():
        np.testing.assert_array_equal(features(name), want)
    assert features("b.svs").shape == (0, 1280)

# -- 3: partly corrupt JPEG tiles ------------------------------------------------------------------------

def corrupt_tiles(path: Path, page: int, every: int) -> int:
    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[page].dataoffsets, tif.pages[page].databytecounts
    n = 0
    with open(path, "r+b") as f:
        for i in range(0, len(offsets), every):
            f.seek(offsets[i])
            f.write(b"\x00" * counts[i])  # no longer a JPEG stream
            n += 1
    return n


def test_corrupt_tiles_fall_back_then_blank(tmp_path, slides):
    seg = segmentation_model_factory("otsu")
    enc = encoder_factory("efficientnet_lite0")
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        coords, attrs = tissue_coords(wsi, 20, 256, mask=wsi.segment_tissue(seg, device="cpu"))
        clean = patch_features(wsi, enc, coords, attrs, "cpu", 16)
    level1 = tmp_path / "level1.svs"
    shutil.copy(slides["aperio_40x"], level1)
    assert corrupt_tiles(level1, 1, 3) > 0  # 20x reads come from level 1: fall back to level 0
    stats = {}
    with tl.load_wsi(str(level1)) as wsi:
        feats = patch_features(wsi, enc, coords, attrs, "cpu", 16, stats=stats)
    assert stats["blank_tiles"] == 0 and np.isfinite(feats).all()
    cos = (feats * clean).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(clean, axis=1)
    assert cos.min() > 0.9  # re-read from level 0: nearly the same pixels
    both = tmp_path / "both.svs"
    shutil.copy(level1, both)
    corrupt_tiles(both, 0, 2)
    stats = {}
    with tl.load_wsi(str(both)) as wsi:
        feats = patch_features(wsi, enc, coords, attrs, "cpu", 16, stats=stats)
    assert 0 < stats["blank_tiles"] < len(coords) and np.isfinite(feats).all()


def test_corrupt_tiles_reported_by_a_check(platform, slides):
    settings, defs, instance, inbox, out = platform
    shutil.copy(slides["aperio_40x"], inbox / "damaged.svs")
    corrupt_tiles(inbox / "damaged.svs", 1, 2)
    corrupt_tiles(inbox / "damaged.svs", 0, 2)
    result = run_slide(defs, instance, "damaged.svs")
    assert result.success
    tiles = checks(result)["tiles_readable"]
    assert not tiles.passed and tiles.severity == dg.AssetCheckSeverity.WARN
    assert "blank" in tiles.metadata["failing"].value["damaged.svs"]


# -- 4: no mpp, then supplied through the inbox's slide list ---------------------------------------------

def test_missing_mpp_then_supplied(platform, slides):
    settings, defs, instance, inbox, out = platform
    shutil.copy(slides["no_mpp"], inbox / "nompp.tif")
    result = run_slide(defs, instance, "nompp.tif")
    msg = failure_message(result)
    assert not result.success and "nompp.tif" in msg
    assert "no pixel size" in msg and "mpp" in msg and "slide list" in msg
    (inbox / "slides.csv").write_text("wsi,mpp\nnompp.tif,0.5\n")
    again = run_slide(defs, instance, "nompp.tif")
    assert again.success
    with h5py.File(out / COORDS / "patches" / "nompp.tif_patches.h5") as f:
        assert f["coords"].attrs["level0_magnification"] == 20


# -- 7: tiny, single level, odd mpp ---------------------------------------------------------------------

@pytest.mark.parametrize("name,status", [("tiny", "no_tissue"), ("single_level", "ok"), ("odd_mpp", "ok"),
                                         ("with_holes", "ok")])
def test_awkward_slides(platform, slides, name, status):
    settings, defs, instance, inbox, out = platform
    shutil.copy(slides[name], inbox / f"{name}.svs")
    result = run_slide(defs, instance, f"{name}.svs")
    assert result.success
    assert checks(result)["tissue_found"].passed == (status == "ok")
    with h5py.File(out / COORDS / FEATS / f"{name}.svs.h5") as f:
        assert f["features"].shape[1] == 1280 and (f["features"].shape[0] > 0) == (status == "ok")


# -- 11: deleted after registration; replaced -------------------------------------------------------------

def test_deleted_and_replaced_slides(platform, slides):
    settings, defs, instance, inbox, out = platform
    shutil.copy(slides["aperio_20x"], inbox / "s.svs")
    assert run_slide(defs, instance, "s.svs").success
    version = instance.get_latest_materialization_event(dg.AssetKey("slide_file")).asset_materialization.tags[
        "dagster/data_version"]
    shutil.copy(slides["aperio_40x"], inbox / "s.svs")  # a different scan under the same name
    os.utime(inbox / "s.svs", (1, 2_000_000_000))
    assert run_slide(defs, instance, "s.svs").success
    new_version = instance.get_latest_materialization_event(dg.AssetKey("slide_file")).asset_materialization.tags[
        "dagster/data_version"]
    assert new_version != version  # downstream assets read as stale against the new file until re-run
    with h5py.File(out / COORDS / "patches" / "s.svs_patches.h5") as f:
        assert f["coords"].attrs["level0_magnification"] == 40  # re-processed from the new file
    os.remove(inbox / "s.svs")
    gone = run_slide(defs, instance, "s.svs")
    assert not gone.success and "deleted or renamed" in failure_message(gone)


# -- 12, 13: hand-edited GeoJSON; truncated or foreign upstream HDF5 -------------------------------------

def test_edited_geojson_and_broken_upstream_files(platform, slides):
    settings, defs, instance, inbox, out = platform
    shutil.copy(slides["aperio_40x"], inbox / "s.svs")
    assert run_slide(defs, instance, "s.svs").success
    coords_job = dg.AssetSelection.assets(dg.AssetKey(["patch_coords", COORDS]))
    features_job = dg.AssetSelection.assets(dg.AssetKey(["patch_features", "efficientnet_lite0"]))
    job = defs.resolve_job_def("process_slides")

    geo = out / "contours_geojson" / "s.svs.geojson"
    bowtie = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [2000, 2000], [2000, 0], [0, 2000], [0, 0]]]}}]}
    geo.write_text(json.dumps(bowtie))  # a hand edit in QuPath, self-intersecting
    assert job.execute_in_process(partition_key="s.svs", instance=instance, asset_selection=list(
        coords_job.resolve(defs.resolve_asset_graph()))).success
    with h5py.File(out / COORDS / "patches" / "s.svs_patches.h5") as f:
        assert 0 < f["coords"].shape[0] <= 16  # patches inside the edited 2000 x 2000 bow tie only

    geo.write_text("{ not json")
    bad = job.execute_in_process(partition_key="s.svs", instance=instance, raise_on_error=False,
                                 asset_selection=list(coords_job.resolve(defs.resolve_asset_graph())))
    assert not bad.success and "s.svs" in failure_message(bad) and "re-materialize" in failure_message(bad)

    coords_file = out / COORDS / "patches" / "s.svs_patches.h5"
    coords_file.write_bytes(coords_file.read_bytes()[:200])  # truncated
    broken = job.execute_in_process(partition_key="s.svs", instance=instance, raise_on_error=False,
                                    asset_selection=list(features_job.resolve(defs.resolve_asset_graph())))
    assert not broken.success and "unreadable" in failure_message(broken)
    assert run_slide(defs, instance, "s.svs").success  # re-materializing upstream fixes it
    with h5py.File(out / COORDS / FEATS / "s.svs.h5") as f:
        assert f["features"].shape[0] > 0


# -- 15: multi-file and DICOM slides that are broken ----------------------------------------------------------

def test_mrxs_without_data_folder_and_malformed_dicom(tmp_path):
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_text("[GENERAL]\nSLIDE_VERSION=01.02\n")
    with pytest.raises(SlideReadError, match="slide.mrxs"):
        tl.load_wsi(str(mrxs))
    dcm = tmp_path / "bad.dcm"
    dcm.write_bytes(Path(fixture_slide("openslide-boxes-dicom/boxes_0.dcm")).read_bytes()[:700])
    with pytest.raises(SlideReadError, match="bad.dcm"):
        tl.load_wsi(str(dcm))


# -- faults ---------------------------------------------------------------------------------------------

def test_two_writers_leave_one_complete_file(tmp_path):
    path = tmp_path / "f.h5"
    attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20,
             "overlap": 0, "name": "s", "savetodir": ".", "level0_width": 10, "level0_height": 10}
    arrays = [np.full((2000, 64), i, np.float32) for i in range(4)]

    def write(i):
        for _ in range(5):
            save_features_h5(str(path), arrays[i], np.zeros((2000, 2)), attrs, {"encoder": "x"})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    with h5py.File(path) as f:
        feats = f["features"][:]
    assert any(np.array_equal(feats, a) for a in arrays)  # one writer's whole file, never a mix
    assert not list(tmp_path.glob(".*.tmp"))


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    real = h5py.Group.create_dataset

    def full(self, name, *args, **kwargs):
        if name == "features":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(OSError, match="No space left"):
        save_features_h5(str(tmp_path / "f.h5"), np.zeros((3, 4)), np.zeros((3, 2)), {}, {"encoder": "x"})
    assert list(tmp_path.iterdir()) == []


class FlakyInbox(Inbox):
    """An inbox on a network filesystem that fails its first read."""

    def open(self, slide, **kwargs):
        marker = Path(self.cache_dir) / "failed-once"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("x")
            raise OSError(errno.EIO, "Input/output error (flaky network filesystem)")
        return super().open(slide, **kwargs)


def test_transient_errors_are_retried_bad_input_is_not(tmp_path, slides):
    (tmp_path / "inbox").mkdir()
    settings = make_settings(tmp_path)
    shutil.copy(slides["aperio_20x"], tmp_path / "inbox" / "s.svs")
    (tmp_path / "inbox" / "bad.svs").write_text("no")
    flaky = FlakyInbox(path=settings.inbox, cache_dir=str(tmp_path / "cache"))
    defs = build_definitions(settings, resources={"inbox": flaky})
    with dg.instance_for_test() as instance:
        ok = run_slide(defs, instance, "s.svs")
        restarts = [e for e in ok.all_events if e.event_type_value == "STEP_RESTARTED"]
        assert ok.success and len(restarts) == 1
        bad = run_slide(defs, instance, "bad.svs")
        assert not bad.success
        assert not [e for e in bad.all_events if e.event_type_value == "STEP_RESTARTED"]


# -- security -----------------------------------------------------------------------------------------------

class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/trident-pwned",))


def test_weights_never_unpickle_code(tmp_path):
    if os.path.exists("/tmp/trident-pwned"):
        os.remove("/tmp/trident-pwned")
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    with pytest.raises(ValueError, match="evil.pth"):
        load_state_dict(str(path), "resnet50")
    assert not os.path.exists("/tmp/trident-pwned")


def test_credentials_are_redacted():
    assert redact("s3://AKIA:secret@bucket/inbox") == "s3://***@bucket/inbox"
    assert redact("/data/inbox") == "/data/inbox"


def test_webserver_binds_localhost_by_default():
    from trident_assets.cli import build_parser

    assert build_parser().parse_args(["up"]).host == "127.0.0.1"
