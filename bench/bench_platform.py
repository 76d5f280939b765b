"""Orchestration overhead of a cohort backfill: a real daemon and webserver, a 20-slide backfill launched
through the webserver's GraphQL API (as the UI does), against the library doing the same work in one
plain process (the baseline, measured in the same run).

    .venv/bin/python bench/bench_platform.py [--slides 20]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import peak_rss_mib, save

from trident_assets.services import (backfill_runs, backfill_status, free_port, graphql, instance_home,
                                     launch_backfill, start_daemon, start_webserver, stop, workspace_file)
from trident_lib import load_wsi
from trident_lib.extraction import patch_features, slide_embedding
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import tissue_coords
from trident_lib.segmentation import segment_tissue
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.slide_encoder_models import encoder_factory as slide_encoder_factory
from trident_lib.synthetic import Ellipse, SlideSpec, write_slide

DAEMONS = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"
ASSETS = [["slide_file"], ["tissue_contours"], ["patch_coords", "20x_256px_0px_overlap"],
          ["patch_features", "efficientnet_lite0"], ["slide_embeddings", "mean-efficientnet_lite0"]]


def library_baseline(paths: list[str]) -> float:
    """The same stages in one process, models loaded once: what the platform must not add much to."""
    seg = segmentation_model_factory("otsu")
    enc = encoder_factory("efficientnet_lite0")
    mean = slide_encoder_factory("mean-efficientnet_lite0")
    t0 = time.perf_counter()
    for p in paths:
        with load_wsi(p) as wsi:
            gdf = segment_tissue(wsi, seg, holes_are_tissue=False, device="cpu")
            coords, attrs = tissue_coords(wsi, 20, 256, mask=gdf)
            feats = patch_features(wsi, enc, coords, attrs, "cpu", 32)
            slide_embedding(feats, coords, attrs, mean, "cpu")
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--per-run", type=int, default=16, help="slides_per_run (the default config's)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trident-bench-platform-"))
    inbox, out = tmp / "inbox", tmp / "out"
    paths = [write_slide(str(inbox / f"s{i:02d}.svs"), SlideSpec(3072, 2048, seed=i, tissue=[
        Ellipse(1536, 1024, 1100 + 10 * i, 700)])) for i in range(args.slides)]
    base = library_baseline(paths)

    home = instance_home(tmp / "home")
    config = tmp / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\nslides_per_run: {args.per_run}\n"
                      f"inbox_sensor: false\n"
                      f"patch_encoders:\n  - name: efficientnet_lite0\n    batch_size: 32\n"
                      f"slide_encoders:\n  - mean-efficientnet_lite0\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)}
    workspace = workspace_file(tmp / "workspace.yaml")
    port = free_port()
    log = open(tmp / "services.log", "w")
    web = start_webserver(workspace, env, log, port)
    daemon = None
    try:
        deadline = time.time() + 120
        while True:  # wait for the webserver and let the sensor register the slides
            try:
                if graphql(port, "{ version }").get("data"):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "webserver did not start"
            time.sleep(1)
        os.environ["DAGSTER_HOME"] = str(home)
        import dagster as dg

        instance = dg.DagsterInstance.get()
        keys = sorted(p.name for p in inbox.iterdir())
        instance.add_dynamic_partitions("slides", keys)
        daemon = start_daemon(workspace, env, log)
        while True:  # measure the backfill, not the daemon's start
            statuses = graphql(port, DAEMONS)["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
            if all(d["healthy"] for d in statuses):
                break
            assert time.time() < deadline + 120, statuses
            time.sleep(1)
        t0 = time.perf_counter()
        backfill = launch_backfill(port, ASSETS, keys)
        while (status := backfill_status(port, backfill)) is None:
            time.sleep(1)
        wall = time.perf_counter() - t0
        runs = backfill_runs(port, backfill)
    finally:
        if daemon:
            stop(daemon)
        stop(web)
        log.close()
    done = len(list((out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0").glob("*.h5")))
    n = args.slides
    run_time = max(r["endTime"] for r in runs) - min(r["startTime"] for r in runs)
    overhead = run_time - base
    print(f"backfill of {n} slides ({status}, {done} embeddings written) in {len(runs)} runs of up to "
          f"{args.per_run} slides")
    print(f"library alone, one process:      {base:8.1f} s   {base / n:6.2f} s/slide (baseline)")
    print(f"runs, first start to last end:   {run_time:8.1f} s   {run_time / n:6.2f} s/slide  "
          f"({run_time / base:.2f} x baseline)")
    print(f"orchestration overhead:          {overhead:8.1f} s   {overhead / n:6.2f} s/slide (runs minus library)")
    print(f"backfill wall time:              {wall:8.1f} s   {wall / n:6.2f} s/slide (adds the backfill daemon's "
          f"30 s ticks to start runs and to notice the end)")
    save(f"platform_{args.per_run}_per_run", {"slides": n, "runs": len(runs), "per_run": args.per_run,
                                              "status": status, "embeddings": done, "library_s": base,
                      "run_time_s": run_time, "overhead_per_slide_s": overhead / n, "backfill_wall_s": wall,
                      "wall_per_slide_s": wall / n, "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
