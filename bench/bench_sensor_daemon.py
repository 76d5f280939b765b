"""A large drop through a real daemon: N new files in the inbox of a freshly started daemon; how long until all
of them are partitions and requested (one backfill over them, above backfill_above_slides), and how many runs
the daemon has created for them within 3 minutes, against the sensor's own evaluation measured in the same
process (the baseline). The runs themselves are not waited for.

    .venv/bin/python bench/bench_sensor_daemon.py [--files 10000]
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import save

from trident_assets.services import instance_home, start_daemon, stop, workspace_file


def requested_slides(instance) -> int:
    """Slides requested so far: in the sensor's backfills, or in its runs (a partition or a range each)."""
    subsets = [b.asset_backfill_data.target_subset for b in instance.get_backfills()]
    if subsets:
        return sum(s.num_partitions_and_non_partitioned_assets // len(s.asset_keys) for s in subsets)
    return sum(int(r.tags.get("trident/slides", 1)) for r in instance.get_runs())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--window", type=float, default=180)
    args = parser.parse_args()
    n = args.files
    tmp = Path(tempfile.mkdtemp(prefix="trident-bench-sensor-"))
    inbox = tmp / "inbox"
    inbox.mkdir()
    for i in range(n):
        (inbox / f"slide-{i:05d}.svs").write_bytes(b"x")
    config = tmp / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {tmp / 'out'}\ninbox_settle_seconds: 0\n")
    home = instance_home(tmp / "home")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)}
    os.environ.update({"DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)})
    import dagster as dg

    from trident_assets.definitions import build_definitions

    defs = build_definitions()  # with this trident.yaml
    # Baseline: one evaluation of the sensor in this process (no daemon, no storage writes).
    sensor = defs.resolve_sensor_def("inbox_sensor")
    with dg.instance_for_test() as scratch:
        t0 = time.perf_counter()
        result = sensor(dg.build_sensor_context(instance=scratch, resources=defs.resources, definitions=defs))
        tick = time.perf_counter() - t0
    expected_runs = len(result.run_requests)
    backfill = expected_runs == 1 and result.run_requests[0].requires_backfill_daemon()

    log = open(tmp / "services.log", "w")
    t0 = time.perf_counter()
    daemon = start_daemon(workspace_file(tmp / "workspace.yaml"), env, log)
    marks, window = {}, args.window
    try:
        with dg.DagsterInstance.get() as instance:
            while time.perf_counter() - t0 < window:
                if "partitions" not in marks and len(instance.get_dynamic_partitions("slides")) == n:
                    marks["partitions"] = time.perf_counter() - t0
                if "requested" not in marks and requested_slides(instance) == n:
                    marks["requested"] = time.perf_counter() - t0
                time.sleep(0.5)
            requested = instance.get_runs_count()
    finally:
        stop(daemon)
        log.close()
    print(f"{n} new files: the sensor's evaluation alone {tick:.2f} s, "
          f"{'one backfill' if backfill else f'{expected_runs} runs'} (baseline)")
    print(f"real daemon from its start: all partitions after {marks.get('partitions', float('nan')):.1f} s, "
          f"all requested after {marks.get('requested', float('nan')):.1f} s; {requested} runs created "
          f"after {window} s")
    save("sensor_daemon", {"files": n, "evaluation_s": tick, "backfill": backfill, "runs": expected_runs,
                           "window_s": window, "runs_created_in_window": requested, **marks})
    if "requested" not in marks:
        print((tmp / "services.log").read_text()[-4000:])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
