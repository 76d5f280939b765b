"""trident-dagster: what labs do from a shell.

  init      write a commented trident.yaml and dagster_home/ into a folder (the lab's project folder)
  up        start the platform (webserver + daemon on 127.0.0.1) with the sample cohort in the inbox
  run       process every slide in the inbox to completion without the UI, then print where outputs are
  add       link (or copy) a folder of slides into the inbox; the sensor picks them up
  backfill  materialize assets (e.g. a new encoder) over the whole cohort, several slides per run
  status    per-slide status table
  batch     TRIDENT-style batch processing of a folder without Dagster (also: convert, doctor)

Every command uses the project folder: the current one, or --project DIR ($TRIDENT_PROJECT). Its
trident.yaml ($TRIDENT_CONFIG) and dagster_home/ ($DAGSTER_HOME) are used when present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from trident_lib.batch import add_subcommands

from .settings import (CONFIG_ENV, PROJECT_ENV, config_path, ensure_dagster_home, init_project, load_settings,
                       project_dir)


def _instance():
    os.environ["DAGSTER_HOME"] = str(ensure_dagster_home())
    import dagster as dg

    return dg.DagsterInstance.get()


def cmd_init(args) -> int:
    written = init_project(args.folder)
    for path in written:
        print(f"wrote {path}")
    print(f"{args.folder}: project folder ready ({len(written)} file(s) written, existing files kept). "
          f"Run `trident-dagster up` there, or pass --project {args.folder}.")
    return 0


def cmd_up(args) -> int:
    from .sample import write_sample_cohort

    if not os.environ.get(CONFIG_ENV):  # first start in this folder: the commented configuration to edit
        for path in init_project(project_dir()):
            print(f"wrote {path}")
    settings = load_settings()
    if not args.no_sample:
        written = write_sample_cohort(settings.resolve(settings.inbox))
        print(f"sample cohort: {len(written)} new slide(s) in {settings.resolve(settings.inbox)}")
    _instance()  # creates the instance's storage before the daemon and the webserver start at once
    # The code location runs in processes that dagster starts: they find the lab's files through these.
    os.environ.update({CONFIG_ENV: str(config_path()), PROJECT_ENV: str(project_dir())})
    os.chdir(project_dir())
    print(f"Dagster UI: http://{args.host}:{args.port}  (the inbox sensor registers slides within a minute)")
    dagster = shutil.which("dagster") or os.path.join(os.path.dirname(sys.executable), "dagster")
    os.execv(dagster, [dagster, "dev", "-m", "trident_assets", "-h", args.host, "-p", str(args.port)])


def _register_inbox(instance, settings) -> list[str]:
    from .assets import Inbox, slides

    found = Inbox(path=settings.resolve(settings.inbox), extensions=list(settings.extensions)).scan()
    known = set(instance.get_dynamic_partitions(slides.name))
    new = sorted(set(found) - known)
    if new:
        instance.add_dynamic_partitions(slides.name, new)
    return sorted(found)


def materialize_in_batches(defs, instance, job_name: str, keys: list[str], batch: int, selection=None) -> list[str]:
    """One run per batch of slides (a model loads once per batch); returns the slides whose run failed."""
    from tqdm import tqdm

    job = defs.resolve_job_def(job_name)
    failed = []
    with tqdm(total=len(keys), unit="slide", desc=job_name) as bar:
        for i in range(0, len(keys), batch):
            chunk = keys[i:i + batch]
            tags = {"dagster/asset_partition_range_start": chunk[0], "dagster/asset_partition_range_end": chunk[-1]}
            result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False,
                                            asset_selection=selection)
            if not result.success:
                failed.extend(chunk)
            bar.update(len(chunk))
    return failed


def _ordered(instance, keys: list[str]) -> list[str]:
    """Partition ranges follow registration order: keep the keys in that order."""
    order = instance.get_dynamic_partitions("slides")
    return [k for k in order if k in set(keys)]


def cmd_run(args) -> int:
    from .definitions import build_definitions
    from .sample import write_sample_cohort

    settings = load_settings()
    if args.sample:
        write_sample_cohort(settings.resolve(settings.inbox))
    instance = _instance()
    defs = build_definitions(settings)
    keys = _ordered(instance, _register_inbox(instance, settings))
    print(f"{len(keys)} slide(s) in {settings.resolve(settings.inbox)}")
    failed = materialize_in_batches(defs, instance, "process_slides", keys, settings.slides_per_run)
    defs.resolve_job_def("refresh_cohort_tables").execute_in_process(instance=instance, raise_on_error=False)
    print_status(settings, keys)
    print(f"\noutputs: {settings.resolve(settings.storage)}")
    print(f"cohort tables: {os.path.join(settings.resolve(settings.storage), 'cohort')}")
    if failed:
        print(f"runs with a failed slide: {', '.join(failed)} (see the status column and the Dagster UI)")
    return 1 if failed and args.strict else 0


def cmd_add(args) -> int:
    settings = load_settings()
    inbox = settings.resolve(settings.inbox)
    os.makedirs(inbox, exist_ok=True)
    added = 0
    for root, _, files in os.walk(args.folder):
        for name in files:
            src = os.path.join(root, name)
            dst = os.path.join(inbox, os.path.relpath(src, args.folder))
            if os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst) if args.copy else os.symlink(os.path.abspath(src), dst)
            added += 1
    print(f"{added} file(s) added to {inbox}; the inbox sensor registers them on its next tick.")
    return 0


def cmd_backfill(args) -> int:
    import dagster as dg

    from .definitions import build_definitions

    settings = load_settings()
    instance = _instance()
    defs = build_definitions(settings)
    keys = _ordered(instance, args.slides or _register_inbox(instance, settings))
    selection = dg.AssetSelection.assets(*[dg.AssetKey.from_user_string(a) for a in args.asset])
    if args.with_upstream:
        selection = selection.upstream()
    keys_sel = sorted(selection.resolve(defs.resolve_asset_graph()))
    failed = materialize_in_batches(defs, instance, "process_slides", keys, args.batch or
                                    settings.slides_per_run, selection=keys_sel)
    print(f"done: {len(keys) - len(failed)} slide(s) ok, {len(failed)} in failed runs")
    return 1 if failed else 0


def print_status(settings, keys: list[str]) -> None:
    from .assets import qc_table
    from .io_managers import TridentIOManager

    table = qc_table(settings, TridentIOManager(base_path=settings.resolve(settings.storage)), keys, _instance())
    if table.empty:
        print("no slides")
        return
    cols = [c for c in table.columns if c != "error"]
    print(table[cols].to_string(index=False))
    for _, row in table[table["error"] != ""].iterrows():
        print(f"  {row['slide']}: {row['error']}")


def cmd_status(args) -> int:
    settings = load_settings()
    print_status(settings, _instance().get_dynamic_partitions("slides"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trident-dagster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", help="the lab's project folder (default: the current folder)")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write trident.yaml and dagster_home/ into a folder")
    init.add_argument("folder", nargs="?", default=".")
    init.set_defaults(fn=cmd_init)
    up = sub.add_parser("up", help="start webserver and daemon with the sample cohort")
    up.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    up.add_argument("--port", type=int, default=3000)
    up.add_argument("--no-sample", action="store_true", help="do not write the sample cohort into the inbox")
    up.set_defaults(fn=cmd_up)
    run = sub.add_parser("run", help="process the inbox headless, then print where outputs are")
    run.add_argument("--sample", action="store_true", help="write the sample cohort into the inbox first")
    run.add_argument("--strict", action="store_true", help="exit non-zero when a slide failed")
    run.set_defaults(fn=cmd_run)
    add = sub.add_parser("add", help="add a folder of slides to the inbox")
    add.add_argument("folder")
    add.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    add.set_defaults(fn=cmd_add)
    bf = sub.add_parser("backfill", help="materialize assets over the cohort, several slides per run")
    bf.add_argument("--asset", action="append", required=True, help="e.g. patch_features/uni_v1 (repeatable)")
    bf.add_argument("--slides", nargs="*", help="only these slide ids (default: all)")
    bf.add_argument("--batch", type=int, help="slides per run")
    bf.add_argument("--with-upstream", action="store_true", help="also (re)materialize upstream assets")
    bf.set_defaults(fn=cmd_backfill)
    st = sub.add_parser("status", help="per-slide status")
    st.set_defaults(fn=cmd_status)
    add_subcommands(sub)  # batch, convert, doctor: the library alone, no Dagster
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.project:
        os.environ[PROJECT_ENV] = os.path.abspath(args.project)
    args.argv = argv[argv.index(args.command) + 1:]
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
