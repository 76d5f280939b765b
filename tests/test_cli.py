"""The shell entry points a lab uses: headless run, status, add, backfill, batch sharding, doctor."""

import os
import shutil
import subprocess
import sys

import pandas as pd

from trident_assets.services import instance_home

CLI = [sys.executable, "-m", "trident_assets.cli"]


def cli(args, env, timeout=900):
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_headless_run_status_add_backfill(tmp_path, slides):
    config = tmp_path / "trident.yaml"
    config.write_text(f"inbox: {tmp_path / 'inbox'}\nstorage: {tmp_path / 'out'}\nslides_per_run: 3\n"
                      "patch_encoders:\n  - name: efficientnet_lite0\n    batch_size: 16\n"
                      "slide_encoders:\n  - mean-efficientnet_lite0\n")
    env = {**os.environ, "TRIDENT_CONFIG": str(config), "DAGSTER_HOME": str(instance_home(tmp_path / "home"))}
    run = cli(["run", "--sample"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sample-01.svs" in run.stdout and "no_tissue" in run.stdout and str(tmp_path / "out") in run.stdout
    qc = pd.read_parquet(tmp_path / "out" / "cohort" / "cohort_qc.parquet").set_index("slide")
    assert qc["qc_pass"].sum() == 5 and not qc.loc["sample-05-blank.svs", "qc_pass"]
    assert qc.loc["CMU-1-Small-Region.svs", "patches_20x_256px_0px_overlap"] > 50  # the real H&E sample slide
    assert len(list((tmp_path / "out" / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0")
                    .glob("*.h5"))) == 6

    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(slides["aperio_20x"], extra / "new.svs")
    added = cli(["add", str(extra)], env)
    assert added.returncode == 0 and (tmp_path / "inbox" / "new.svs").is_symlink()

    backfill = cli(["backfill", "--asset", "slide_file", "--asset", "tissue_contours"], env)
    assert backfill.returncode == 0, backfill.stderr[-3000:]
    assert "7 slide(s) ok" in backfill.stdout
    status = cli(["status"], env)
    assert status.returncode == 0 and "new.svs" in status.stdout and "sample-03.svs" in status.stdout


def test_batch_shards_over_devices(tmp_path, slides):
    wsis = tmp_path / "wsis"
    wsis.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(slides["aperio_20x"], wsis / f"{name}.svs")
    job = tmp_path / "job"
    result = cli(["batch", "--task", "all", "--feat_batch_size", "16", "--wsi_dir", str(wsis), "--job_dir", str(job),
                  "--gpus", "cpu,cpu"],
                 os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (job / "20x_256px_0px_overlap" / "patches").glob("*.h5")) == \
        ["a_patches.h5", "b_patches.h5", "c_patches.h5"]
    assert len(list((job / "runs").glob("*.json"))) == 2  # one process per device
    assert result.stdout.count("slide(s) from") == 2


def test_doctor(tmp_path):
    result = cli(["doctor"], os.environ, timeout=300)
    assert result.returncode == 0
    assert "OpenSlide 4" in result.stdout and "efficientnet_lite0" in result.stdout
    assert "efficientnet-lite0-57934424.pth" in result.stdout


def test_batch_flags_reach_the_processor(tmp_path, slides):
    wsis = tmp_path / "wsis"
    wsis.mkdir()
    shutil.copy(slides["aperio_20x"], wsis / "a.svs")
    refused = cli(["batch", "--task", "all", "--wsi_dir", str(wsis), "--job_dir", str(tmp_path / "job40"),
                   "--mag", "40", "--max_upsampling", "1.5"], os.environ)
    assert refused.returncode == 1 and "too low for patches at 40x" in refused.stdout + refused.stderr
    fast = cli(["batch", "--task", "all", "--wsi_dir", str(wsis), "--job_dir", str(tmp_path / "job"),
                "--feat_batch_size", "16", "--fast_cpu", "--fast_read"], os.environ)
    assert fast.returncode == 0, fast.stderr[-3000:]
    states = "".join(p.read_text() for p in (tmp_path / "job" / "wsi_states").glob("*.json"))
    assert '"fast_cpu": true' in states and '"fast_read": true' in states
