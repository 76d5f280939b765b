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
        assert f["coords"].shape == (58, 2)
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


# -- resume by settings: an output is reused only when what produced it is unchanged ------------------------

def _stage(proc, name):
    return [s for s in proc._record["stages"] if s["stage"] == name][-1]


def _n_coords(path):
    with h5py.File(path) as f:
        return f["coords"].shape[0]


def _state(job):
    (path,) = (job / "wsi_states").glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture()
def one_slide(tmp_path, slides):
    wsis = tmp_path / "wsis"
    wsis.mkdir()
    shutil.copy(slides["aperio_20x"], wsis / "s.svs")
    return wsis


def test_patching_redone_when_its_settings_change(tmp_path, one_slide):
    job = tmp_path / "job"
    coords = job / "20x_256px_0px_overlap" / "patches" / "s_patches.h5"
    proc = Processor(str(job), str(one_slide))
    proc.run_segmentation_job(segmentation_model_factory("otsu"), device="cpu")
    proc.run_patching_job(20, 256, visualize=False)
    n_all = _n_coords(coords)

    proc = Processor(str(job), str(one_slide))  # a rerun with another threshold
    proc.run_patching_job(20, 256, visualize=False, min_tissue_proportion=0.9)
    assert _stage(proc, "patching")["redone"] == {"s": "settings changed"}
    assert 0 < _n_coords(coords) < n_all
    proc.run_patching_job(20.0, 256, visualize=False, min_tissue_proportion=0.9)  # same settings (20.0 == 20)
    assert _stage(proc, "patching")["skipped"] == 1

    # Outputs without recorded settings (older job folders) are redone, not trusted.
    state_path = next((job / "wsi_states").glob("*.json"))
    state = json.loads(state_path.read_text())
    del state["settings"]
    state_path.write_text(json.dumps(state))
    proc.run_patching_job(20, 256, visualize=False, min_tissue_proportion=0.9)
    assert _stage(proc, "patching")["redone"] == {"s": "no settings recorded"}


def test_segmenter_change_redoes_contours_and_patching(tmp_path, slides):
    wsis = tmp_path / "wsis"
    wsis.mkdir()
    shutil.copy(slides["with_holes"], wsis / "h.svs")
    job = tmp_path / "job"
    coords = job / "20x_256px_0px_overlap" / "patches" / "h_patches.h5"

    def run(**seg):
        proc = Processor(str(job), str(wsis))
        proc.run_segmentation_job(segmentation_model_factory("otsu", confidence_thresh=seg.pop("thresh", 0.5)),
                                  device="cpu", **seg)
        proc.run_patching_job(20, 256, visualize=False)
        return proc

    run(holes_are_tissue=False)
    with_hole = _n_coords(coords)
    proc = run(holes_are_tissue=True)
    for stage in ("segmentation", "patching"):
        assert _stage(proc, stage)["redone"] == {"h": "settings changed"}, stage
    assert _n_coords(coords) > with_hole  # the hole is tissue now
    proc = run(holes_are_tissue=True)
    assert _stage(proc, "segmentation")["skipped"] == _stage(proc, "patching")["skipped"] == 1
    proc = run(holes_are_tissue=True, thresh=0.4)  # a segmenter setting
    assert _stage(proc, "segmentation")["done"] == _stage(proc, "patching")["done"] == 1


@pytest.fixture()
def random_ckpts(tmp_path):
    """Two different random checkpoints for efficientnet_lite0 (small), and their sha256."""
    import hashlib

    import torch
    from trident_lib.patch_encoder_models.timm_family import build_efficientnet_lite0

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"lite0_{seed}.pth"
        torch.save(build_efficientnet_lite0().state_dict(), path)
        out.append((str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


def test_features_redone_when_weights_change(tmp_path, one_slide, random_ckpts):
    job = tmp_path / "job"
    feats = job / "20x_256px_0px_overlap" / "features_efficientnet_lite0" / "s.h5"
    (a, _), (b, _) = random_ckpts
    proc = Processor(str(job), str(one_slide))
    proc.run_segmentation_job(segmentation_model_factory("otsu"), device="cpu")
    proc.run_patching_job(20, 256, visualize=False)

    def extract(ckpt):
        proc.run_patch_feature_extraction_job("20x_256px_0px_overlap",
                                              encoder_factory("efficientnet_lite0", weights_path=ckpt), "cpu",
                                              batch_limit=16)
        with h5py.File(feats) as f:
            return _stage(proc, "features_efficientnet_lite0"), f["features"][:]

    first, fa = extract(a)
    assert first["done"] == 1
    again, _ = extract(a)  # same file, new encoder object
    assert again["skipped"] == 1
    other, fb = extract(b)
    assert other["redone"] == {"s": "settings changed"} and not np.allclose(fa, fb)


def test_slide_encoder_job_uses_the_patch_checkpoint(tmp_path, one_slide, random_ckpts):
    from trident_lib.batch import main

    job = tmp_path / "job"
    (a, sha_a), (b, sha_b) = random_ckpts
    key = "20x_256px_0px_overlap/features_efficientnet_lite0/s.h5"
    args = ["batch", "--task", "all", "--wsi_dir", str(one_slide), "--job_dir", str(job), "--gpus", "cpu",
            "--slide_encoder", "mean-efficientnet_lite0", "--feat_batch_size", "16"]
    assert main(args + ["--patch_encoder_ckpt_path", a]) == 0
    assert _state(job)["settings"][key]["settings"]["patch_encoder"]["weights"] == sha_a
    slide = job / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0" / "s.h5"
    with h5py.File(slide) as f:
        emb_a = f["features"][:]

    assert main(args + ["--patch_encoder_ckpt_path", b]) == 0
    assert _state(job)["settings"][key]["settings"]["patch_encoder"]["weights"] == sha_b
    with h5py.File(slide) as f:
        assert not np.allclose(f["features"][:], emb_a)  # the slide features follow their patch features
