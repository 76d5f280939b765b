"""A cohort upload through the sensor, as labs use the platform: N slides dropped into the inbox of a freshly
started platform (daemon on a new instance, default settings) until the last slide embedding exists,
against `trident-dagster batch --task all` on the same files in the same run (the baseline).

    .venv/bin/python bench/bench_upload.py [--slides 20] [--settle 30]

The overhead is split per stage from the instance's event log: waiting for the files to settle and the
sensor's tick, runs queued, run start (process, imports), the steps themselves, and the gap to the end.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save

from trident_assets.services import instance_home, start_daemon, stop, workspace_file

SLIDES = [ROOT / "tests" / "fixtures" / "slides" / n for n in ("synthetic-40x.svs", "synthetic-20x.svs")]
CLI = str(Path(sys.executable).parent / "trident-dagster")


def drop(inbox: Path, n: int) -> list[Path]:
    inbox.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(SLIDES[i % 2], inbox / f"slide-{i:04d}.svs")) for i in range(n)]


def batch_baseline(tmp: Path, n: int) -> float:
    wsis = tmp / "batch-wsis"
    drop(wsis, n)
    t0 = time.perf_counter()
    subprocess.run([CLI, "batch", "--task", "all", "--wsi_dir", str(wsis), "--job_dir", str(tmp / "batch-job"),
                    "--slide_encoder", "mean-efficientnet_lite0", "--feat_batch_size", "32"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def stage_split(home: Path) -> dict:
    """Seconds per stage, summed over runs, from the event log."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg
    from dagster._core.events import DagsterEventType

    out = {"runs": 0, "queued_s": 0.0, "run_start_s": 0.0, "steps_s": {}}
    with dg.DagsterInstance.get() as instance:
        for record in instance.get_run_records():
            run = record.dagster_run
            out["runs"] += 1
            created, start = record.create_timestamp.timestamp(), record.start_time or 0
            out["queued_s"] += max(0.0, start - created)
            steps = {}
            for e in instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START,
                                                            DagsterEventType.STEP_SUCCESS,
                                                            DagsterEventType.STEP_FAILURE}):
                steps.setdefault(e.step_key, []).append(e.timestamp)
            if steps:
                out["run_start_s"] += min(min(t) for t in steps.values()) - start
            for key, ts in steps.items():
                name = key.split("__")[0]
                out["steps_s"][name] = out["steps_s"].get(name, 0.0) + max(ts) - min(ts)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--settle", type=float, default=30, help="inbox_settle_seconds (the default config's)")
    args = parser.parse_args()
    n = args.slides
    tmp = Path(tempfile.mkdtemp(prefix="trident-bench-upload-"))
    base = batch_baseline(tmp, n)

    inbox, out = tmp / "inbox", tmp / "out"
    config = tmp / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\ninbox_settle_seconds: {args.settle}\n")
    log = open(tmp / "services.log", "w")
    t0 = time.perf_counter()  # start-up included: a fresh instance and daemon
    home = instance_home(tmp / "home")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)}
    daemon = start_daemon(workspace_file(tmp / "workspace.yaml"), env, log)
    drop(inbox, n)
    target = out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
    try:
        while not (target.exists() and len(list(target.glob("*.h5"))) == n):
            assert daemon.poll() is None, (tmp / "services.log").read_text()[-3000:]
            assert time.perf_counter() - t0 < max(3600, 4 * base), "not done after 4 times the batch time"
            time.sleep(1)
        wall = time.perf_counter() - t0
    finally:
        stop(daemon)
        log.close()
    split = stage_split(home)
    steps = sum(split["steps_s"].values())
    print(f"{n} slides dropped into the inbox of a fresh platform (settle {args.settle:g} s)")
    print(f"batch CLI, same files:          {base:8.1f} s  (baseline)")
    print(f"platform, until last embedding: {wall:8.1f} s  ratio {wall / base:.2f}")
    print(f"  runs: {split['runs']}; queued {split['queued_s']:.1f} s, run start {split['run_start_s']:.1f} s, "
          f"steps {steps:.1f} s (summed over runs)")
    for name, secs in sorted(split["steps_s"].items(), key=lambda kv: -kv[1]):
        print(f"    {name:<40} {secs:8.1f} s")
    save(f"upload_{n}", {"slides": n, "settle_s": args.settle, "batch_s": base, "platform_s": wall,
                         "ratio": wall / base, **split})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
