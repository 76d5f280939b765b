"""The same 20-slide upload through the inbox sensor in the embedded setting (SQLite, in-process executor) and
in the scale-out setting (PostgreSQL, Celery with one CPU worker and one gpu-queue worker; Redis broker), in
one invocation, on this machine: the wall time ratio and where each step's time goes.

    .venv/bin/python bench/bench_scaleout.py [--slides 20] [--per-run 16]

Needs the postgresql and redis-server packages (as for tests/test_scaleout.py). No GPU here: the gpu-queue
worker runs on the CPU, so this measures orchestration, not GPU speed.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
from common import save

from trident_assets.services import (SCALEOUT_INSTANCE, Postgres, Redis, instance_home, start_celery_worker,
                                     start_daemon, stop, workspace_file)
from trident_lib.synthetic import Ellipse, SlideSpec, write_slide

EMBEDDINGS = Path("20x_256px_0px_overlap") / "slide_features_mean-efficientnet_lite0"
T = dg.DagsterEventType
KINDS = ("slide_file", "tissue_contours", "patch_coords", "patch_features", "slide_embeddings")


def upload(setting: str, sources: list[str], folder: Path, per_run: int, env: dict, extra: str, workers) -> dict:
    """Copy the slides into an empty inbox with the daemon running; wait for every embedding."""
    inbox, out = folder / "inbox", folder / "out"
    inbox.mkdir(parents=True)
    config = folder / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\nslides_per_run: {per_run}\ninbox_settle_seconds: 1\n"
                      f"patch_encoders:\n  - name: efficientnet_lite0\n    batch_size: 32\n"
                      f"slide_encoders:\n  - mean-efficientnet_lite0\n{extra}")
    env = {**env, "TRIDENT_CONFIG": str(config)}
    log = open(folder / "services.log", "w")
    procs = [start_daemon(workspace_file(folder / "workspace.yaml"), env, log)] + \
        [start(env, log) for start in workers]
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        time.sleep(20)  # processes up and importing; the sensor's first tick sees an empty inbox
        t0 = time.time()
        for src in sources:
            shutil.copy(src, inbox / Path(src).name)
        while True:
            runs = instance.get_runs()
            if len(list((out / EMBEDDINGS).glob("*.h5"))) == len(sources) and runs and \
                    all(r.is_finished for r in runs if r.tags.get("dagster/sensor_name") == "inbox_sensor"):
                break
            assert all(p.poll() is None for p in procs), (folder / "services.log").read_text()[-3000:]
            assert time.time() - t0 < 1800, f"{setting}: not done after 30 minutes"
            time.sleep(1)
        wall = max(p.stat().st_mtime for p in (out / EMBEDDINGS).glob("*.h5")) - t0
        runs = [r for r in instance.get_runs() if r.tags.get("dagster/sensor_name") == "inbox_sensor"]
        return {"setting": setting, "wall_s": wall, "runs": len(runs),
                "failed_runs": sum(r.status != dg.DagsterRunStatus.SUCCESS for r in runs),
                **step_times(instance, [r.run_id for r in runs])}
    finally:
        for p in procs:
            stop(p)
        log.close()


def step_times(instance, run_ids) -> dict:
    """Per step kind, from the event log: compute (STEP_START to STEP_SUCCESS), and the rest of the time a
    run spent on the step: Celery's dispatch (task sent -> worker picks it up), the worker's setup (-> STEP_START),
    and the handoff to the next step (STEP_SUCCESS -> next step starts or is sent)."""
    per_kind = {k: {"compute": [], "dispatch": [], "setup": [], "handoff": []} for k in KINDS}
    run_seconds, compute_total, models = [], 0.0, {"loaded": 0, "reused": 0, "load_s": 0.0}
    for run_id in run_ids:
        logs = instance.all_logs(run_id)
        for e in logs:  # "model loaded: NAME on DEVICE in worker HOST:PID (Ns)" from the GPU steps
            if not e.is_dagster_event and e.user_message.startswith("model "):
                how = e.user_message.split()[1].rstrip(":")
                models[how] += 1
                models["load_s"] += float(e.user_message.rsplit("(", 1)[1].rstrip("s)")) if how == "loaded" else 0
        events = [e for e in logs if e.is_dagster_event]
        stamps: dict[str, dict[str, float]] = {}
        for e in events:
            kind = e.dagster_event.event_type
            if e.step_key and kind in (T.STEP_START, T.STEP_SUCCESS):
                stamps.setdefault(e.step_key, {})[kind.name] = e.timestamp
            elif e.step_key and kind == T.ENGINE_EVENT and "Submitting celery task" in e.message:
                stamps.setdefault(e.step_key, {})["submit"] = e.timestamp
            elif e.step_key and kind == T.ENGINE_EVENT and "Executing steps" in e.message:
                stamps.setdefault(e.step_key, {})["picked"] = e.timestamp
        starts = sorted(min(s.get("submit", s.get("STEP_START", 0)), s.get("STEP_START", 0)) for s in stamps.values())
        run_start = next(e.timestamp for e in events if e.dagster_event.event_type == T.RUN_START)
        run_end = next(e.timestamp for e in reversed(events) if e.dagster_event.event_type == T.RUN_SUCCESS)
        run_seconds.append(run_end - run_start)
        for step, s in stamps.items():
            kind = next((k for k in KINDS if step.startswith(k)), None)
            if kind is None or "STEP_SUCCESS" not in s:
                continue
            d = per_kind[kind]
            d["compute"].append(s["STEP_SUCCESS"] - s["STEP_START"])
            compute_total += s["STEP_SUCCESS"] - s["STEP_START"]
            if "submit" in s:
                d["dispatch"].append(s["picked"] - s["submit"])
                d["setup"].append(s["STEP_START"] - s["picked"])
            later = [t for t in starts if t >= s["STEP_SUCCESS"]]
            d["handoff"].append((later[0] if later else run_end) - s["STEP_SUCCESS"])
    steps = {k: {**{part: round(statistics.mean(v), 2) if v else None for part, v in d.items()},
                 "dispatch_min": round(min(d["dispatch"]), 2) if d["dispatch"] else None}
             for k, d in per_kind.items()}
    return {"run_seconds_sum": sum(run_seconds), "compute_seconds_sum": compute_total, "steps": steps,
            "models": models}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--per-run", type=int, default=16, help="slides_per_run (the default config's)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trident-bench-scaleout-"))
    sources = [write_slide(str(tmp / "src" / f"s{i:02d}.svs"), SlideSpec(3072, 2048, seed=i, tissue=[
        Ellipse(1536, 1024, 1100 + 10 * i, 700)])) for i in range(args.slides)]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "TRIDENT_"))}
    load = {"before": os.getloadavg()}

    home = instance_home(tmp / "embedded" / "home")
    embedded = upload("embedded (SQLite, in-process)", sources, tmp / "embedded", args.per_run,
                      {**base_env, "DAGSTER_HOME": str(home)}, "", [])
    load["after_embedded"] = os.getloadavg()

    log = open(tmp / "db.log", "w")
    pg = Postgres(log)
    redis = Redis(tmp / "redis", log)
    try:
        env = {**base_env, **pg.env, "TRIDENT_CELERY_BROKER": redis.url}
        os.environ.update(pg.env)
        env["DAGSTER_HOME"] = str(instance_home(tmp / "scaleout" / "home", SCALEOUT_INSTANCE))
        workers = [lambda e, lg: start_celery_worker("cpu", "dagster", e, lg),
                   lambda e, lg: start_celery_worker("gpu0", "gpu", e, lg, cuda_device="0")]
        scaleout = upload("scale-out (Postgres, Celery 1 CPU + 1 gpu worker)", sources, tmp / "scaleout",
                          args.per_run, env, "executor: celery\n", workers)
    finally:
        redis.stop()
        pg.stop()
        log.close()
    load["after_scaleout"] = os.getloadavg()

    n = args.slides
    print(f"{n} slides uploaded into the inbox, {args.per_run} slides per run; load average (1, 5, 15 min) "
          f"before {load['before'][0]:.2f}/{load['before'][1]:.2f}/{load['before'][2]:.2f}, "
          f"after {load['after_scaleout'][0]:.2f}/{load['after_scaleout'][1]:.2f}/{load['after_scaleout'][2]:.2f}")
    for r in (embedded, scaleout):
        print(f"\n{r['setting']}: upload -> last embedding {r['wall_s']:.1f} s ({r['wall_s'] / n:.2f} s/slide), "
              f"{r['runs']} runs ({r['failed_runs']} failed); run time {r['run_seconds_sum']:.1f} s of which "
              f"step compute {r['compute_seconds_sum']:.1f} s; models loaded {r['models']['loaded']} times "
              f"({r['models']['load_s']:.1f} s), reused {r['models']['reused']} times")
        print(f"  {'step (seconds, mean)':22s} {'compute':>8s} {'dispatch (min)':>15s} {'setup':>7s} {'handoff':>8s}")
        for kind, d in r["steps"].items():
            cells = [f"{d[p]:.2f}" if d[p] is not None else "-"
                     for p in ("compute", "dispatch", "dispatch_min", "setup", "handoff")]
            dispatch = f"{cells[1]} ({cells[2]})" if d["dispatch"] is not None else "-"
            print(f"  {kind:22s} {cells[0]:>8s} {dispatch:>15s} {cells[3]:>7s} {cells[4]:>8s}")
    print("dispatch: task sent -> a worker starts it (includes waiting behind other runs' steps for the one "
          "worker of its queue); setup: -> STEP_START; handoff: STEP_SUCCESS -> the run's next step starts or is "
          "sent (embedded: includes waiting for the gpu pool)")
    ratio = scaleout["wall_s"] / embedded["wall_s"]
    print(f"\nscale-out / embedded wall time: {ratio:.2f}")
    save(f"scaleout_{args.per_run}_per_run", {"slides": n, "per_run": args.per_run, "embedded": embedded, "scaleout": scaleout,
                      "ratio": ratio, "loadavg": load})


if __name__ == "__main__":
    main()
