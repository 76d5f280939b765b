import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pytest

from trident_lib import Processor
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.processor import LOCK_SUFFIX, clear_dead_locks, output_lock
from trident_lib.segmentation_models import segmentation_model_factory

from conftest import fixture_slide

CLI = [sys.executable, "-m", "trident_assets.cli", "batch"]


@pytest.fixture()
def wsi_dir(tmp_path, slides):
    d = tmp_path / "wsis"
    (d / "nested").mkdir(parents=True)
    os.symlink(fixture_slide("CMU-1-Small-Region.svs"), d / "CMU-1-Small-Region.svs")
    shutil.copy(slides["aperio_20x"], d / "scan.svs")
    shutil.copy(slides["aperio_40x"], d / "nested" / "scan.svs")  # same file name, different folder
    (d / "broken.svs").write_text("not a slide")
    return d


def run_cli(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=600, **kw)


def layout_files(job: Path) -> set[str]:
    return {str(p.relative_to(job)) for p in job.rglob("*") if p.is_file() and p.suffix in (".h5", ".geojson", ".jpg")}


def test_cli_batch_layout_errors_and_resume(tmp_path, wsi_dir):
    job = tmp_path / "job"
    common = ["--task", "all", "--wsi_dir", str(wsi_dir), "--job_dir", str(job), "--search_nested",
              "--feat_batch_size", "16"]
    strict = run_cli(common)
    assert strict.returncode == 1 and "broken" in strict.stderr + strict.stdout  # stops at the broken slide
    first = run_cli(common + ["--skip_errors"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "broken: SlideReadError" in first.stdout and "broken.svs" in first.stdout
    files = layout_files(job)
    for name in ("CMU-1-Small-Region", "scan", "nested__scan"):
        assert f"contours_geojson/{name}.geojson" in files
        assert f"20x_256px_0px_overlap/patches/{name}_patches.h5" in files
        assert f"20x_256px_0px_overlap/features_efficientnet_lite0/{name}.h5" in files
        assert f"20x_256px_0px_overlap/visualization/{name}.jpg" in files
    with h5py.File(job / "20x_256px_0px_overlap/patches/CMU-1-Small-Region_patches.h5") as f:
        assert f["coords"].shape == (60, 2)
    with h5py.File(job / "20x_256px_0px_overlap/patches/nested__scan_patches.h5") as f:
        assert f["coords"].attrs["level0_magnification"] == 40  # not confused with the 20x scan.svs
    run = json.loads(next((job / "runs").glob("*.json")).read_text())
    assert run["status"] == "failed" and run["stages"][0]["done"] + run["stages"][0]["failed"] >= 1
    states = {p.name.split("__")[0] for p in (job / "wsi_states").glob("*.json")}
    assert {"broken", "scan", "CMU-1-Small-Region"} <= states
    assert "## " in (job / "summary.md").read_text()

    again = run_cli(common + ["--skip_errors"])
    assert again.returncode == 0
    for line in again.stdout.splitlines():
        if line.strip().startswith(("segmentation", "patching", "features_")):
            assert " done    0" in line, line  # everything complete is skipped
    assert "skipped    3" in again.stdout


def test_killed_run_resumes_to_identical_files(tmp_path, wsi_dir):
    (wsi_dir / "broken.svs").unlink()
    reference, job = tmp_path / "reference", tmp_path / "job"
    args = ["--task", "all", "--wsi_dir", str(wsi_dir), "--search_nested", "--feat_batch_size", "8"]
    assert run_cli(args + ["--job_dir", str(reference)]).returncode == 0
    proc = subprocess.Popen(CLI + args + ["--job_dir", str(job)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    feats = job / "20x_256px_0px_overlap" / "features_efficientnet_lite0"
    deadline = time.time() + 300
    while time.time() < deadline and not (feats.exists() and list(feats.glob("*.h5"))):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of feature extraction
    proc.wait()
    visible = list(feats.glob("*.h5"))
    assert 1 <= len(visible) < 3
    for path in visible:  # whatever is visible is complete
        with h5py.File(path) as f:
            assert f["features"].shape[0] == f["coords"].shape[0]
    resumed = run_cli(args + ["--job_dir", str(job), "--clear_dead_locks"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(job.rglob("*" + LOCK_SUFFIX)) and not list(job.rglob(".*.tmp"))
    for ref in (reference / "20x_256px_0px_overlap").rglob("*.h5"):
        other = job / ref.relative_to(reference)
        with h5py.File(ref) as a, h5py.File(other) as b:
            for name in a:
                np.testing.assert_array_equal(a[name][:], b[name][:])


def test_processor_matches_dagster_assets(tmp_path, slides):
    from trident_assets.definitions import build_definitions
    from trident_assets.settings import PatchEncoderConfig, Settings, SlideEncoderConfig

    wsis = tmp_path / "wsis"
    wsis.mkdir()
    shutil.copy(slides["aperio_40x"], wsis / "s.svs")
    proc = Processor(str(tmp_path / "job"), str(wsis))
    proc.run_segmentation_job(segmentation_model_factory("otsu"), device="cpu")
    proc.run_patching_job(20, 256)
    proc.run_patch_feature_extraction_job("20x_256px_0px_overlap", encoder_factory("efficientnet_lite0"), "cpu",
                                          batch_limit=16)
    settings = Settings(inbox=str(wsis), storage=str(tmp_path / "out"),
                        patch_encoders=(PatchEncoderConfig("efficientnet_lite0", batch_size=16),),
                        slide_encoders=(SlideEncoderConfig("mean-efficientnet_lite0"),))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("slides", ["s.svs"])
        assert build_definitions(settings).resolve_job_def("process_slides").execute_in_process(
            partition_key="s.svs", instance=instance).success
    pairs = [("20x_256px_0px_overlap/patches/s_patches.h5", "20x_256px_0px_overlap/patches/s.svs_patches.h5"),
             ("20x_256px_0px_overlap/features_efficientnet_lite0/s.h5",
              "20x_256px_0px_overlap/features_efficientnet_lite0/s.svs.h5")]
    for a, b in pairs:
        with h5py.File(tmp_path / "job" / a) as fa, h5py.File(tmp_path / "out" / b) as fb:
            np.testing.assert_array_equal(fa["coords"][:], fb["coords"][:])
            if "features" in fa:
                np.testing.assert_array_equal(fa["features"][:], fb["features"][:])


def test_custom_list_mpp_and_missing(tmp_path, slides):
    wsis = tmp_path / "wsis"
    wsis.mkdir()
    shutil.copy(slides["no_mpp"], wsis / "nompp.tif")
    shutil.copy(slides["aperio_40x"], wsis / "a.svs")
    (tmp_path / "list.csv").write_text("wsi,mpp\nnompp.tif,0.5\nghost.svs,0.25\n")
    with pytest.warns(UserWarning, match="ghost.svs"):
        proc = Processor(str(tmp_path / "job"), str(wsis), custom_list_of_wsis=str(tmp_path / "list.csv"))
    assert [w.name for w in proc.wsis] == ["nompp"] and proc.missing_from_list == ["ghost.svs"]
    assert proc.wsis[0].mpp is None  # lazy
    proc.wsis[0]._lazy_initialize()
    assert proc.wsis[0].mpp == 0.5 and proc.wsis[0].mag == 20


def test_locks(tmp_path):
    out = tmp_path / "x.h5"
    with output_lock(str(out)):
        lock = Path(str(out) + LOCK_SUFFIX)
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and "host" in info and "time" in info
        with pytest.raises(FileExistsError):
            with output_lock(str(out)):
                pass
        assert clear_dead_locks(str(tmp_path)) == []  # alive: kept
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "time": "x"}))
    (tmp_path / ".x.h5.abc.tmp").write_text("partial")
    removed = clear_dead_locks(str(tmp_path))
    assert str(lock) in removed and not lock.exists() and not (tmp_path / ".x.h5.abc.tmp").exists()


def test_deprecations(tmp_path):
    with pytest.warns(DeprecationWarning, match="wsi_cache"):
        Processor(str(tmp_path / "job"), str(tmp_path), wsi_cache="/tmp/cache")
