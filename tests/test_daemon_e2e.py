"""End to end: a real daemon and webserver; slides copied into the inbox slowly, or under a temporary name,
become slide embeddings with one successful run each; slides dropped together run together, a slide
replaced in place runs again, and a drop above backfill_above_slides becomes one backfill."""

import os
import shutil
import time
import urllib.request

import h5py

from trident_assets.services import (backfill_runs, backfill_status, free_port, graphql, instance_home,
                                     start_daemon, start_webserver, stop, workspace_file)


RUNS = "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }"
BACKFILLS = "{ partitionBackfillsOrError { ... on PartitionBackfills { results { id numPartitions } } } }"
PARTITIONS = '{ assetNodeOrError(assetKey: {path: ["slide_file"]}) { ... on AssetNode { partitionKeys } } }'
SENSOR_TICKS = """{ repositoriesOrError { ... on RepositoryConnection { nodes { sensors { name
  sensorState { ticks(limit: 1) { status } } } } } } }"""


def inbox_sensor_ticked(port: int) -> bool:
    try:
        repos = graphql(port, SENSOR_TICKS)["data"]["repositoriesOrError"]["nodes"]
    except (OSError, KeyError, TypeError, ValueError):  # the webserver or the code location is still starting
        return False
    return any(s["sensorState"]["ticks"] for r in repos for s in r["sensors"] if s["name"] == "inbox_sensor")


def slides_run(port: int, tags: list[dict]) -> list[str]:
    """The slides the runs of these tags covered (a run's partition, or its range of partitions), with repeats."""
    partitions = graphql(port, PARTITIONS)["data"]["assetNodeOrError"]["partitionKeys"]  # in the order added
    out = []
    for t in tags:
        start, end = t.get("dagster/asset_partition_range_start"), t.get("dagster/asset_partition_range_end")
        out += [t["dagster/partition"]] if "dagster/partition" in t else \
            partitions[partitions.index(start):partitions.index(end) + 1] if start else []
    return out


def test_inbox_to_embedding_with_daemon(tmp_path, slides):
    home = instance_home(tmp_path / "dagster_home")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    config = tmp_path / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\nbackfill_above_slides: 4\n"
                      f"patch_encoders:\n  - name: efficientnet_lite0\n    batch_size: 16\n"
                      f"slide_encoders:\n  - mean-efficientnet_lite0\n")
    workspace = workspace_file(tmp_path / "workspace.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    log = open(tmp_path / "services.log", "w")
    daemon = start_daemon(workspace, env, log)
    web = start_webserver(workspace, env, log, port)
    try:
        # The slow copy must span sensor ticks: wait for the daemon's first (start-up takes a while on CI).
        deadline = time.time() + 180
        while time.time() < deadline and not inbox_sensor_ticked(port):
            assert daemon.poll() is None, (tmp_path / "services.log").read_text()[-3000:]
            time.sleep(2)
        assert inbox_sensor_ticked(port), (tmp_path / "services.log").read_text()[-3000:]
        # A slow copy: the file grows in pieces over more than two sensor ticks (15 s each).
        data = open(slides["aperio_20x"], "rb").read()
        pieces = 10
        with open(inbox / "new scan.svs", "wb") as f:
            for i in range(pieces):
                f.write(data[i * len(data) // pieces:(i + 1) * len(data) // pieces])
                f.flush()
                time.sleep(4)
        # A copy tool's temporary name, renamed once complete.
        shutil.copy(slides["aperio_40x"], inbox / "other.svs.part")
        time.sleep(16)
        os.rename(inbox / "other.svs.part", inbox / "other.svs")

        target = out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
        deadline = time.time() + 420
        while time.time() < deadline and not (target.exists() and len(list(target.glob("*.h5"))) == 2):
            assert daemon.poll() is None, (tmp_path / "services.log").read_text()[-3000:]
            time.sleep(3)
        files = sorted(target.glob("*.h5")) if target.exists() else []
        assert len(files) == 2, "no slide embeddings after 7 minutes:\n" + \
            (tmp_path / "services.log").read_text()[-5000:]
        assert files[0].name.startswith("new_scan-") and files[1].name == "other.svs.h5"
        with h5py.File(files[0]) as f:
            assert f["features"].shape == (1280,)
        runs = graphql(port, RUNS)["data"]["runsOrError"]["results"]
        tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs]
        assert all(r["status"] in ("SUCCESS", "STARTED", "QUEUED", "STARTING") for r in runs), runs
        # Each slide in one sensor run, no retry (they may share one if both became ready in the same tick).
        by_sensor = sorted(slides_run(port, [t for t in tags if t.get("dagster/sensor_name") == "inbox_sensor"]))
        assert by_sensor == sorted(["other.svs", files[0].name.removesuffix(".h5")])

        # Three slides dropped at once: one run over the three partitions. A slide replaced in place: one
        # new run for it alone, and its embedding is rewritten.
        batch = ("batch a.svs", "batch b.svs", "batch c.svs")
        for name in batch:
            shutil.copy(slides["aperio_20x"], inbox / f"{name}.part")
        for name in batch:  # renamed together, so the sensor sees them in the same tick
            os.replace(inbox / f"{name}.part", inbox / name)
        before = (target / "other.svs.h5").stat().st_mtime
        shutil.copy(slides["aperio_20x"], inbox / "other.svs.part")
        os.replace(inbox / "other.svs.part", inbox / "other.svs")
        deadline = time.time() + 420
        while time.time() < deadline and not (len(list(target.glob("*.h5"))) == 5 and
                                              (target / "other.svs.h5").stat().st_mtime > before):
            assert daemon.poll() is None, (tmp_path / "services.log").read_text()[-3000:]
            time.sleep(3)
        assert len(list(target.glob("*.h5"))) == 5, (tmp_path / "services.log").read_text()[-5000:]
        assert (target / "other.svs.h5").stat().st_mtime > before
        runs = graphql(port, RUNS)["data"]["runsOrError"]["results"]
        tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs if r["status"] == "SUCCESS"]
        ranges = [(t["dagster/asset_partition_range_start"], t["dagster/asset_partition_range_end"])
                  for t in tags if "dagster/asset_partition_range_start" in t]
        assert any(a.startswith("batch") and b.startswith("batch") and a != b for a, b in ranges)  # run together
        assert slides_run(port, tags).count("other.svs") == 2

        # Five slides at once (above backfill_above_slides): one backfill over them, whose run makes them.
        drop = [f"drop {i}.svs" for i in range(5)]
        for name in drop:
            shutil.copy(slides["aperio_20x"], inbox / f"{name}.part")
        for name in drop:
            os.replace(inbox / f"{name}.part", inbox / name)
        deadline = time.time() + 420
        while time.time() < deadline and len(list(target.glob("*.h5"))) < 10:
            assert daemon.poll() is None, (tmp_path / "services.log").read_text()[-3000:]
            time.sleep(3)
        assert len(list(target.glob("*.h5"))) == 10, (tmp_path / "services.log").read_text()[-5000:]
        [backfill] = graphql(port, BACKFILLS)["data"]["partitionBackfillsOrError"]["results"]
        assert backfill["numPartitions"] == 5
        deadline = time.time() + 120
        while time.time() < deadline and backfill_status(port, backfill["id"]) is None:
            time.sleep(3)
        assert backfill_status(port, backfill["id"]) == "COMPLETED_SUCCESS"
        assert [r["status"] for r in backfill_runs(port, backfill["id"])] == ["SUCCESS"]  # the 5 in one run

        nodes = graphql(port, "{ assetNodes { assetKey { path } } }")["data"]["assetNodes"]
        paths = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {"slide_file", "tissue_contours", "slide_embeddings/mean-efficientnet_lite0"} <= paths
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop(web)
        stop(daemon)
        log.close()
