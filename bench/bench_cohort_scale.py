"""Large cohorts: the cost of refreshing cohort_qc after one new slide, of one automation evaluation, and of
the inbox sensor's ticks (N new files at once, then one more), at 1,000 and 10,000 slides. Slides' outputs
are small real files (a GeoJSON square and its coords HDF5 per slide) recorded as materializations, so no
slide is actually processed; the inbox holds N small files with slide names (the sensor does not open them).

    .venv/bin/python bench/bench_cohort_scale.py [--sizes 1000 10000]

Baselines in the same run: the first (full) build of cohort_qc, which reads every slide.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

import dagster as dg
from shapely.geometry import box
from trident_assets.definitions import build_definitions
from trident_assets.io_managers import Coords, Tissue, TridentIOManager
from trident_assets.settings import Settings
from trident_lib.contours import gdf_from_polygons

COORDS_DIR = "20x_256px_0px_overlap"


def populate(io: TridentIOManager, instance, keys: list[str]) -> None:
    gdf = gdf_from_polygons([box(0, 0, 2048, 2048)])
    coords = np.array([[0, 0], [512, 0]], np.int64)
    attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20,
             "overlap": 0, "name": "x", "savetodir": COORDS_DIR, "level0_width": 4096, "level0_height": 4096}
    from trident_assets.io_managers import _write_local

    for k in keys:
        _write_local(io.file_for(["tissue_contours"], k, None), Tissue(gdf, {"status": "ok", "mpp": 0.25}))
        _write_local(io.file_for(["patch_coords", COORDS_DIR], k, None), Coords(coords, {**attrs, "name": k}))
    for asset in (dg.AssetKey("tissue_contours"), dg.AssetKey(["patch_coords", COORDS_DIR])):
        for k in keys:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=k))


def refresh(defs, instance) -> tuple[float, int]:
    qc = defs.get_assets_def("cohort_qc")
    t0 = time.perf_counter()
    result = dg.materialize([qc], instance=instance, resources=defs.resources, selection=[qc.key])
    seconds = time.perf_counter() - t0
    return seconds, result.asset_materializations_for_node("cohort_qc")[0].metadata["slides_read"].value


def sensor_ticks(defs, instance, inbox: Path, n: int) -> dict:
    """First tick over n new files (partitions added as the daemon would), a quiet tick once they are older
    than the listing margin, and a tick after one more file: time, runs and backfills requested, cursor size."""
    from trident_assets.sensors import build_inbox_sensor

    inbox.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (inbox / f"slide-{i:05d}.svs").write_bytes(b"x")
    sensor = build_inbox_sensor(16, settle_seconds=0, late_seconds=1)
    out, cursor = {}, None
    for name in ("new_files", "quiet", "one_more"):
        if name == "quiet":
            time.sleep(1.5)
        if name == "one_more":
            (inbox / "late.svs").write_bytes(b"x")
        t0 = time.perf_counter()
        result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources,
                                                definitions=defs))
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions("slides", request.partition_keys)
        backfills = sum(r.requires_backfill_daemon() for r in result.run_requests)
        out[name] = {"seconds": time.perf_counter() - t0, "runs": len(result.run_requests) - backfills,
                     "backfills": backfills, "cursor_bytes": len(result.cursor)}
        cursor = result.cursor
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    results = {}
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="trident-bench-cohort-"))
        settings = Settings(inbox=str(tmp / "inbox"), storage=str(tmp / "out"))
        defs = build_definitions(settings)
        io = defs.resources["trident_io"]
        with dg.instance_for_test() as instance:
            keys = [f"slide-{i:05d}.svs" for i in range(n)]
            instance.add_dynamic_partitions("slides", keys)
            t0 = time.perf_counter()
            evaluation = dg.evaluate_automation_conditions(defs=defs, instance=instance)
            auto_empty = time.perf_counter() - t0
            t0 = time.perf_counter()
            populate(io, instance, keys[:-1])
            setup = time.perf_counter() - t0
            full, read_full = refresh(defs, instance)
            populate(io, instance, keys[-1:])  # one new slide
            one, read_one = refresh(defs, instance)
            t0 = time.perf_counter()
            dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=evaluation.cursor)
            auto_done = time.perf_counter() - t0
        with dg.instance_for_test() as instance:
            ticks = sensor_ticks(defs, instance, Path(settings.inbox), n)
        results[n] = {"full_refresh_s": full, "slides_read_full": read_full, "one_new_slide_refresh_s": one,
                      "slides_read_one": read_one, "automation_tick_nothing_materialized_s": auto_empty,
                      "automation_tick_after_s": auto_done, "setup_s": setup, "sensor": ticks}
        print(f"{n:>6} slides: full cohort_qc build {full:6.2f} s ({read_full} read, baseline); after one new slide "
              f"{one:6.2f} s ({read_one} read, {one / full:.2f} x); automation tick {auto_empty:6.2f} s with "
              f"nothing materialized, {auto_done:6.2f} s after")
        print("        inbox sensor: " + "; ".join(f"{k} {v['seconds']:.2f} s, {v['runs']} runs, {v['backfills']} "
                                                    f"backfills, cursor {v['cursor_bytes']} B"
                                                    for k, v in ticks.items()))
    save("cohort_scale", results)


if __name__ == "__main__":
    main()
