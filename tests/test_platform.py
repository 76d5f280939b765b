import json
import os
import shutil
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pandas as pd
import pytest

from trident_assets.assets import Inbox
from trident_assets.definitions import build_definitions
from trident_assets.io_managers import TridentIOManager, output_relpath
from trident_assets.keys import slide_key, validate_key
from trident_assets.settings import PatchEncoderConfig, Settings, SlideEncoderConfig, load_settings

from conftest import fixture_slide

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def graph_snapshot(defs) -> dict:
    graph = defs.resolve_asset_graph()
    out = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        out[key.to_user_string()] = {
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitioned": node.partitions_def is not None,
            "pool": node.pools and sorted(node.pools) or None,
            "checks": sorted(c.name for c in node.check_keys),
        }
    return out


def test_definitions_load_and_match_snapshot():
    defs = build_definitions(load_settings())
    defs.resolve_all_job_defs()
    snap = graph_snapshot(defs)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(snap, indent=2, sort_keys=True))
    assert snap == json.loads(SNAPSHOT.read_text())


def test_one_asset_per_configured_encoder(tmp_path):
    s = Settings(inbox=str(tmp_path), storage=str(tmp_path / "out"),
                 patch_encoders=(PatchEncoderConfig("efficientnet_lite0"), PatchEncoderConfig("resnet50"),
                                 PatchEncoderConfig("ctranspath", mag=10)),
                 slide_encoders=(SlideEncoderConfig("mean-resnet50"), SlideEncoderConfig("chief")))
    snap = graph_snapshot(build_definitions(s))
    assert snap["patch_features/resnet50"]["deps"] == ["patch_coords/20x_256px_0px_overlap", "slide_file"]
    assert snap["patch_features/ctranspath"]["deps"] == ["patch_coords/10x_256px_0px_overlap", "slide_file"]
    assert snap["slide_embeddings/chief"]["deps"] == ["patch_features/ctranspath"]
    assert snap["patch_features/resnet50"]["pool"] == ["gpu"]
    with pytest.raises(ValueError, match="titan.*conch_v15"):
        build_definitions(Settings(slide_encoders=(SlideEncoderConfig("titan"),)))


def test_config_file_is_data_only(tmp_path):
    cfg = tmp_path / "trident.yaml"
    cfg.write_text("inbox: x\npatch_encoders:\n  - name: resnet50\n    mag: 10\n")
    s = load_settings(str(cfg))
    assert s.patch_encoders[0].coords_dir == "10x_256px_0px_overlap"
    cfg.write_text("inbox: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception):
        load_settings(str(cfg))
    cfg.write_text("nonsense_key: 1\n")
    with pytest.raises(ValueError, match="nonsense_key"):
        load_settings(str(cfg))


@pytest.mark.parametrize("names", [["a b (1).svs", "a_b_1_.svs"], ["a,b.svs", "a_b.svs", "a|b.svs"],
                                   ["sub1/x.svs", "sub2/x.svs", "x.svs"], ["x.svs", "x.tif"],
                                   ["Åsa é.svs", "Asa e.svs"]])
def test_slide_keys_are_distinct_valid_and_stable(names):
    keys = [slide_key(n) for n in names]
    assert len(set(keys)) == len(keys)
    assert all(validate_key(k) for k in keys)
    assert keys == [slide_key(n) for n in names]


@pytest.mark.parametrize("bad", ["../../x", "/etc/passwd", "a/b", "..", ".", "a,b", "a|b", "", "x" * 300])
def test_bad_keys_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="invalid slide key"):
        validate_key(bad)
    with pytest.raises(ValueError):
        TridentIOManager(base_path=str(tmp_path)).file_for(["tissue_contours"], bad, None)
    assert not any(tmp_path.iterdir())


def test_layout_is_tridents():
    assert output_relpath(["patch_coords", "20x_256px_0px_overlap"], "s.svs", None) == \
        "20x_256px_0px_overlap/patches/s.svs_patches.h5"
    assert output_relpath(["patch_features", "uni_v1"], "s.svs", "20x_256px_0px_overlap") == \
        "20x_256px_0px_overlap/features_uni_v1/s.svs.h5"
    assert output_relpath(["tissue_contours"], "s.svs", None) == "contours_geojson/s.svs.geojson"


@pytest.fixture()
def cohort(tmp_path, slides):
    inbox = tmp_path / "inbox"
    (inbox / "nested").mkdir(parents=True)
    os.symlink(fixture_slide("CMU-1-Small-Region.svs"), inbox / "CMU-1-Small-Region.svs")
    shutil.copy(slides["aperio_20x"], inbox / "nested" / "my slide (2).svs")
    shutil.copy(slides["background"], inbox / "blank.svs")
    (inbox / "broken.svs").write_text("not a slide")
    settings = Settings(inbox=str(inbox), storage=str(tmp_path / "out"), inbox_settle_seconds=0,
                        patch_encoders=(PatchEncoderConfig("efficientnet_lite0", batch_size=16),),
                        slide_encoders=(SlideEncoderConfig("mean-efficientnet_lite0"),))
    return settings, build_definitions(settings)


def run_events(result):
    checks = {}
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION":
            d = e.event_specific_data
            checks[d.check_name] = (d.passed, d.metadata["failing"].value)
    return checks


def test_materialize_every_asset(cohort):
    settings, defs = cohort
    with dg.instance_for_test() as instance:
        keys = sorted(Inbox(path=settings.inbox).scan())
        assert keys == ["CMU-1-Small-Region.svs", "blank.svs", "broken.svs", "nested__my_slide_2_-0ab6e2f4.svs"] \
            or len(keys) == 4
        instance.add_dynamic_partitions("slides", keys)
        job = defs.resolve_job_def("process_slides")
        out = Path(settings.storage)

        ok = job.execute_in_process(partition_key="CMU-1-Small-Region.svs", instance=instance)
        assert ok.success and all(passed for passed, _ in run_events(ok).values())
        with h5py.File(out / "20x_256px_0px_overlap" / "patches" / "CMU-1-Small-Region.svs_patches.h5") as f:
            assert f["coords"].shape == (58, 2)
        feats = out / "20x_256px_0px_overlap" / "features_efficientnet_lite0" / "CMU-1-Small-Region.svs.h5"
        with h5py.File(feats) as f:
            assert f["features"].shape == (58, 1280) and f["coords"].attrs["patch_size"] == 256
        with h5py.File(out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0" /
                       "CMU-1-Small-Region.svs.h5") as f:
            assert f["features"].shape == (1280,)
        assert (out / "contours" / "CMU-1-Small-Region.svs.jpg").exists()
        mat = instance.get_latest_materialization_event(dg.AssetKey(["patch_coords", "20x_256px_0px_overlap"]))
        assert mat.asset_materialization.metadata["patches"].value == 58

        blank = job.execute_in_process(partition_key="blank.svs", instance=instance)
        checks = run_events(blank)
        assert blank.success and checks["tissue_found"] == (False, {"blank.svs": "no_tissue"})
        with h5py.File(out / "20x_256px_0px_overlap" / "features_efficientnet_lite0" / "blank.svs.h5") as f:
            assert f["features"].shape == (0, 1280) and f["coords"].shape == (0, 2)

        broken = job.execute_in_process(partition_key="broken.svs", instance=instance, raise_on_error=False)
        assert not broken.success
        failure = next(e for e in broken.all_events if e.event_type_value == "STEP_FAILURE")
        assert "broken.svs" in failure.event_specific_data.error.message
        assert not (out / "contours_geojson" / "broken.svs.geojson").exists()

        # A batch: the broken slide does not stop the others, and its check says why.
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        batch = job.execute_in_process(instance=instance, tags=tags)
        checks = run_events(batch)
        assert batch.success and "broken.svs" in checks["tissue_found"][1]
        assert "not a readable slide" in checks["tissue_found"][1]["broken.svs"] or \
            "cannot be read" in checks["tissue_found"][1]["broken.svs"]
        nested = next(k for k in keys if k.startswith("nested__"))
        assert (out / "20x_256px_0px_overlap" / "features_efficientnet_lite0" / f"{nested}.h5").exists()

        assert defs.resolve_job_def("refresh_cohort_tables").execute_in_process(instance=instance).success
        qc = pd.read_parquet(out / "cohort" / "cohort_qc.parquet").set_index("slide")
        assert qc.loc["CMU-1-Small-Region.svs", "qc_pass"] and not qc.loc["blank.svs", "qc_pass"]
        assert qc.loc["broken.svs", "status"] == "error" and "broken.svs" in qc.loc["broken.svs", "error"]
        emb = pd.read_parquet(out / "cohort" / "mean-efficientnet_lite0.parquet").set_index("slide")
        assert np.isfinite(emb.loc["CMU-1-Small-Region.svs", "e0"]) and emb.loc["blank.svs", "status"] == "no_tissue"


def covered(result) -> list[str]:
    """The slides a sensor tick's run requests cover (a partition, or a range over the keys it adds)."""
    order = [k for r in result.dynamic_partitions_requests for k in r.partition_keys]
    out = []
    for r in result.run_requests:
        if r.partition_key:
            out.append(r.partition_key)
        else:
            start, end = r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"]
            out += order[order.index(start):order.index(end) + 1]
    return sorted(out)


def test_inbox_sensor_ticks(cohort, tmp_path):
    settings, defs = cohort
    sensor = defs.resolve_sensor_def("inbox_sensor")
    with dg.instance_for_test() as instance:
        def tick(cursor):
            return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources,
                                                  definitions=defs))

        first = tick(None)
        keys = covered(first)
        assert len(keys) == 4 and "broken.svs" in keys  # the broken file gets one run that fails clearly
        assert len(first.run_requests) == 1  # slides that arrive together run together
        assert sorted(first.dynamic_partitions_requests[0].partition_keys) == keys
        instance.add_dynamic_partitions("slides", first.dynamic_partitions_requests[0].partition_keys)

        after = tick(first.cursor)
        assert not after.run_requests and after.skip_reason  # unchanged files, the broken one too, are not retried

        target = Path(settings.inbox) / "blank.svs"
        os.utime(target, (target.stat().st_atime, target.stat().st_mtime + 10))  # replaced in place
        (Path(settings.inbox) / "new.svs").symlink_to(fixture_slide("openslide-small.svs"))
        third = tick(after.cursor)
        assert covered(third) == ["blank.svs", "new.svs"]
        assert third.dynamic_partitions_requests[0].partition_keys == ["new.svs"]


def test_sensor_batches_slides_per_run(cohort):
    settings, _ = cohort
    defs = build_definitions(Settings(**{**settings.__dict__, "slides_per_run": 3}))
    sensor = defs.resolve_sensor_def("inbox_sensor")
    with dg.instance_for_test() as instance:
        first = sensor(dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs))
        assert len(first.run_requests) == 2 and len(covered(first)) == 4  # a range of 3 and a single slide
        assert len({r.run_key for r in first.run_requests}) == 2


def test_sensor_requests_a_big_drop_as_one_backfill(cohort):
    settings, _ = cohort
    defs = build_definitions(Settings(**{**settings.__dict__, "slides_per_run": 3, "backfill_above_slides": 3}))
    sensor = defs.resolve_sensor_def("inbox_sensor")
    with dg.instance_for_test() as instance:
        first = sensor(dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs))
        [request] = first.run_requests  # 4 slides > 3: one backfill, not two runs
        subset = request.asset_graph_subset
        keys = first.dynamic_partitions_requests[0].partition_keys
        assert request.requires_backfill_daemon() and request.tags["trident/drop_slides"] == "4"
        assert subset.asset_keys == defs.resolve_job_def("process_slides").asset_layer.selected_asset_keys
        subsets = subset.partitions_subsets_by_asset_key.values()
        assert all(sorted(s.get_partition_keys()) == sorted(keys) for s in subsets)


def test_automation_sensor_runs_by_default():
    defs = build_definitions(load_settings())
    auto = defs.resolve_sensor_def("trident_automation")
    assert auto.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_sensor_def("inbox_sensor").default_status == dg.DefaultSensorStatus.RUNNING


def test_fsspec_inbox_and_storage(tmp_path, slides):
    """Inbox and outputs on an fsspec filesystem (memory:// here, s3:// in a lab): same assets, same files."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(slides["aperio_20x"], "/inbox-t/remote scan.svs")
    settings = Settings(inbox="memory://inbox-t", storage="memory://out-t",
                        patch_encoders=(PatchEncoderConfig("efficientnet_lite0", batch_size=16),),
                        slide_encoders=(SlideEncoderConfig("mean-efficientnet_lite0"),))
    defs = build_definitions(settings, resources={"inbox": Inbox(path=settings.inbox,
                                                                 cache_dir=str(tmp_path / "cache"))})
    keys = list(Inbox(path=settings.inbox).scan())
    assert len(keys) == 1 and keys[0].startswith("remote_scan-") and keys[0].endswith(".svs")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("slides", keys)
        assert defs.resolve_job_def("process_slides").execute_in_process(partition_key=keys[0],
                                                                         instance=instance).success
    out = f"/out-t/{COORDS_DIR}/features_efficientnet_lite0/{keys[0]}.h5"
    assert fs.exists(out) and not fs.glob("/out-t/**/*.tmp")
    with fs.open(out, "rb") as f, h5py.File(f) as h5:
        assert h5["features"].shape[1] == 1280 and h5["features"].shape[0] == h5["coords"].shape[0] > 0
    fs.rm("/inbox-t", recursive=True)
    fs.rm("/out-t", recursive=True)


COORDS_DIR = "20x_256px_0px_overlap"
