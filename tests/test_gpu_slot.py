"""A run killed while it holds the gpu pool slot gives the slot back (run monitoring), and queued GPU work
proceeds. Real daemon, real runs; the "GPU" steps run on the CPU here, the pool is the same."""

import os
import shutil
import signal
import subprocess
import time

import dagster as dg

from trident_assets.services import instance_home, start_daemon, stop, workspace_file


def test_killed_run_frees_its_gpu_slot(tmp_path, slides):
    home = instance_home(tmp_path / "home")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for name in ("a.svs", "b.svs"):
        shutil.copy(slides["with_holes"], inbox / name)  # enough patches to keep a features step busy
    config = tmp_path / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\npatch_encoders:\n  - name: efficientnet_lite0\n"
                      "    batch_size: 1\nslide_encoders:\n  - mean-efficientnet_lite0\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)}
    log = open(tmp_path / "services.log", "w")
    daemon = start_daemon(workspace_file(tmp_path / "workspace.yaml"), env, log)
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.get() as instance:
            holder, waiting_seen, deadline = None, False, time.time() + 300
            while holder is None and time.time() < deadline:  # the sensor starts both runs; one gets the slot
                info = instance.event_log_storage.get_concurrency_info("gpu")
                if info.claimed_slots:
                    holder = info.claimed_slots[0].run_id
                    waiting_seen = info.pending_step_count > 0 or len(info.claimed_slots) == 1
                time.sleep(0.2)
            assert holder, (tmp_path / "services.log").read_text()[-4000:]
            assert len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots) == 1  # limit 1
            # The run worker's command line does not name its run; its compute-log tail children do.
            tails = subprocess.run(["pgrep", "-f", holder], capture_output=True, text=True).stdout.split()
            workers = {open(f"/proc/{t}/stat").read().split(") ")[1].split()[1] for t in tails
                       if os.path.exists(f"/proc/{t}/stat")}
            assert workers, "could not find the run worker holding the slot"
            for pid in workers:
                os.kill(int(pid), signal.SIGKILL)  # the run dies while holding the gpu slot
            freed = time.time() + 240
            while time.time() < freed:
                slots = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
                if all(s.run_id != holder for s in slots):
                    break
                time.sleep(2)
            assert all(s.run_id != holder for s in slots), "the dead run kept its gpu slot"
            embeddings = out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
            done = time.time() + 420
            while time.time() < done and len(list(embeddings.glob("*.h5"))) < 2:
                time.sleep(3)
            # The other slide's GPU steps ran; the killed run was retried (run_retries) and finished too.
            assert sorted(p.name for p in embeddings.glob("*.h5")) == ["a.svs.h5", "b.svs.h5"], \
                (tmp_path / "services.log").read_text()[-4000:]
            assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.FAILURE
            assert waiting_seen
    finally:
        os.environ.pop("DAGSTER_HOME")
        stop(daemon)
        log.close()
