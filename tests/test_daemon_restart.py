"""A cohort backfill survives a daemon restart: the new daemon picks the backfill up and completes it."""

import os
import shutil
import signal
import time

import dagster as dg

from trident_assets.services import (backfill_runs, backfill_status, free_port, graphql, instance_home,
                                     launch_backfill, start_daemon, start_webserver, stop, workspace_file)

ASSETS = [["slide_file"], ["tissue_contours"], ["patch_coords", "20x_256px_0px_overlap"],
          ["patch_features", "efficientnet_lite0"], ["slide_embeddings", "mean-efficientnet_lite0"]]


def wait_for(fn, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_backfill_completes_across_a_daemon_restart(tmp_path, slides):
    home = instance_home(tmp_path / "home")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        shutil.copy(slides["aperio_20x"], inbox / f"s{i}.svs")
    config = tmp_path / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\nslides_per_run: 1\ninbox_sensor: false\n"
                      "patch_encoders:\n  - name: efficientnet_lite0\n    batch_size: 16\n"
                      "slide_encoders:\n  - mean-efficientnet_lite0\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)}
    workspace = workspace_file(tmp_path / "workspace.yaml")
    port = free_port()
    log = open(tmp_path / "services.log", "w")
    web = start_webserver(workspace, env, log, port)
    daemons = []
    try:
        wait_for(lambda: _up(port), 180, "the webserver")
        os.environ["DAGSTER_HOME"] = str(home)
        try:
            with dg.DagsterInstance.get() as instance:
                instance.add_dynamic_partitions("slides", ["s0.svs", "s1.svs", "s2.svs"])
        finally:
            os.environ.pop("DAGSTER_HOME")
        daemons.append(start_daemon(workspace, env, log))
        backfill = launch_backfill(port, ASSETS, ["s0.svs", "s1.svs", "s2.svs"])
        wait_for(lambda: backfill_runs(port, backfill), 240, "the backfill's first run")
        os.kill(daemons[0].pid, signal.SIGKILL)  # the daemon dies mid-backfill...
        daemons[0].wait()
        time.sleep(3)
        daemons.append(start_daemon(workspace, env, log))  # ...and is restarted
        status = wait_for(lambda: backfill_status(port, backfill), 600, "the backfill to finish")
        assert status == "COMPLETED_SUCCESS", (tmp_path / "services.log").read_text()[-4000:]
        embeddings = out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
        assert sorted(p.name for p in embeddings.glob("*.h5")) == ["s0.svs.h5", "s1.svs.h5", "s2.svs.h5"]
        assert len(backfill_runs(port, backfill)) >= 3
    finally:
        for d in daemons:
            stop(d)
        stop(web)
        log.close()


def _up(port):
    try:
        return bool(graphql(port, "{ version }").get("data"))
    except OSError:
        return False
