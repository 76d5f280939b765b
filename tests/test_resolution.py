"""A scan too coarse for the requested magnification is refused; failed runs show in the status table; a run
waiting for the gpu pool sleeps."""

import shutil
import time
import warnings

import dagster as dg
import pandas as pd
import pytest
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

import trident_lib as tl
from trident_assets import dagster_fixes
from trident_assets.assets import qc_table
from trident_assets.definitions import build_definitions
from trident_assets.io_managers import TridentIOManager
from trident_assets.settings import PatchEncoderConfig, Settings, SlideEncoderConfig
from trident_lib.errors import TooLowResolutionError
from trident_lib.patching import max_plausible_patches
from trident_lib.segmentation_models import segmentation_model_factory

from conftest import fixture_slide


def test_patching_refuses_to_invent_resolution(tmp_path, slides):
    with tl.load_wsi(fixture_slide("camelyon16-lowres.dcm")) as wsi:
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        with pytest.raises(TooLowResolutionError) as err:
            wsi.extract_tissue_coords(20, 256, str(tmp_path))
        assert "camelyon16-lowres" in str(err.value) and "0.3452x" in str(err.value) and "20x" in str(err.value)
        assert "max_upsampling" in str(err.value)
        assert not (tmp_path / "patches").exists()
        # A lab that wants upsampling says so.
        path = wsi.extract_tissue_coords(20, 256, str(tmp_path), max_upsampling=100)
    assert path.endswith("camelyon16-lowres_patches.h5")
    with tl.load_wsi(slides["aperio_20x"]) as wsi, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        wsi.extract_tissue_coords(40, 256, str(tmp_path))  # 2x: allowed by default, with a warning
    assert any("upsampled" in str(w.message) for w in caught)


def test_plausible_patch_count_bound(slides):
    with tl.load_wsi(slides["aperio_40x"]) as wsi:
        gdf = wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        coords, attrs = tl.patching.tissue_coords(wsi, 20, 256)
    assert 0 < len(coords) <= max_plausible_patches(gdf, attrs) < 3 * len(coords)
    # A broken grid (the whole slide at a quarter of the step) is far above what the tissue can hold.
    broken = tl.patching.grid_coords(4096 // 128, 3072 // 128, 128)
    assert len(broken) > 4 * max_plausible_patches(gdf, attrs)


@pytest.fixture()
def platform(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(fixture_slide("camelyon16-lowres.dcm"), inbox / "camelyon.dcm")
    truncated = open(fixture_slide("CMU-1-Small-Region.svs"), "rb").read()
    (inbox / "truncated.svs").write_bytes(truncated[: len(truncated) // 3])
    settings = Settings(inbox=str(inbox), storage=str(tmp_path / "out"),
                        patch_encoders=(PatchEncoderConfig("efficientnet_lite0", batch_size=8),),
                        slide_encoders=(SlideEncoderConfig("mean-efficientnet_lite0"),))
    return settings, build_definitions(settings)


def test_low_resolution_slide_and_failed_run_in_status(platform):
    settings, defs = platform
    job = defs.resolve_job_def("process_slides")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("slides", ["camelyon.dcm", "truncated.svs"])
        low = job.execute_in_process(partition_key="camelyon.dcm", instance=instance, raise_on_error=False)
        assert low.success  # a property of the scan, like no tissue: valid empty outputs and a failed check
        checks = {e.event_specific_data.check_name: e.event_specific_data for e in low.all_events
                  if e.event_type_value == "ASSET_CHECK_EVALUATION"}
        assert not checks["coords_valid"].passed
        assert "too low for patches at 20x" in str(checks["coords_valid"].metadata["failing"].value)
        assert not checks["features_valid"].passed
        io = TridentIOManager(base_path=settings.storage)
        feats = io.read_existing(["patch_features", "efficientnet_lite0"], ["camelyon.dcm"], "20x_256px_0px_overlap")
        assert feats["camelyon.dcm"].features.shape == (0, 1280)  # no features computed
        assert feats["camelyon.dcm"].provenance["status"] == "too_low_resolution"

        # As the inbox sensor runs a slide: the per-slide assets in Dagster's asset job, not process_slides.
        sensor_job = defs.resolve_implicit_global_asset_job_def()
        broken = sensor_job.execute_in_process(partition_key="truncated.svs", instance=instance,
                                               asset_selection=list(job.asset_layer.selected_asset_keys),
                                               raise_on_error=False)
        assert not broken.success
        run = instance.get_run_by_id(broken.run_id)
        assert run.tags.get("dagster/partition") == "truncated.svs"

        cohort = defs.resolve_job_def("refresh_cohort_tables").execute_in_process(instance=instance)
        assert cohort.success
        table = pd.read_parquet(f"{settings.storage}/cohort/cohort_qc.parquet").set_index("slide")
        assert table.loc["camelyon.dcm", "status"] == "too_low_resolution"
        assert "camelyon.dcm" in table.loc["camelyon.dcm", "error"] and not table.loc["camelyon.dcm", "qc_pass"]
        assert table.loc["truncated.svs", "status"] == "error"
        assert "truncated.svs" in table.loc["truncated.svs", "error"]
        same = qc_table(settings, io, ["truncated.svs"], instance)  # what `trident-dagster status` prints
        assert same.loc[0, "status"] == "error"


def test_a_run_waiting_for_a_pool_slot_sleeps():
    """Dagster 1.13 re-checks a blocked pool claim in a busy loop; with the fix it waits for its back-off."""
    dagster_fixes.apply()
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = InstanceConcurrencyContext(instance, dg.DagsterRun(job_name="a", run_id="a" * 36))
        waiter = InstanceConcurrencyContext(instance, dg.DagsterRun(job_name="b", run_id="b" * 36))
        with holder, waiter:
            assert holder.claim("gpu", "features")
            assert not waiter.claim("gpu", "features")
            assert waiter.has_pending_claims() and waiter.interval_to_next_pending_claim_check() > 0
            spins, t0 = 0, time.time()
            while time.time() - t0 < 0.5:  # the executor's loop: claim, then sleep for the interval
                spins += 1
                waiter.claim("gpu", "features")
                time.sleep(waiter.interval_to_next_pending_claim_check())
            assert spins <= 5
            holder.free_step("features")
