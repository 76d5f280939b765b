"""The UI at cohort scale: how long the slide asset's partitions page takes to show in headless Chromium, with
N slide partitions (each with its slide_file and tissue_contours materialized), against the same page with
100 partitions in the same run (the baseline).

    pip install playwright   # drives the system's Chromium (apt install chromium); no browser download
    .venv/bin/python bench/bench_ui.py [--sizes 100 10000]

"Shows" means a partition key of the cohort is on the page. A screenshot per size goes to bench/results/.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, save

from trident_assets.services import free_port, graphql, instance_home, start_webserver, stop, workspace_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def populate(home: Path, n: int) -> None:
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    keys = [f"slide-{i:05d}.svs" for i in range(n)]
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("slides", keys)
        for asset in ("slide_file", "tissue_contours"):
            for k in keys:
                instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=k))


LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { __typename } } } } }"


def wait_up(port: int, timeout: float = 300) -> None:
    """Until the code location is loaded, so page times do not include importing it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            entries = graphql(port, LOCATIONS)["data"]["workspaceOrError"]["locationEntries"]
            if entries and all(e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in entries):
                return
        except (OSError, KeyError, TypeError):
            pass
        time.sleep(1)
    raise RuntimeError("the webserver did not load the code location")


def page_seconds(browser, url: str, n: int, shot: Path) -> float:
    """Seconds from navigation until a partition key shows (Dagster lists the newest first)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_function("keys => keys.some(k => document.body.innerText.includes(k))",
                           arg=[f"slide-{0:05d}.svs", f"slide-{n - 1:05d}.svs"], timeout=300_000)
    seconds = time.perf_counter() - t0
    page.screenshot(path=str(shot))
    page.close()
    return seconds


def main():
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10000])
    args = parser.parse_args()
    results = {}
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="trident-bench-ui-"))
        home = instance_home(tmp / "home")
        t0 = time.perf_counter()
        populate(home, n)
        setup = time.perf_counter() - t0
        config = tmp / "trident.yaml"
        config.write_text(f"inbox: {tmp / 'inbox'}\nstorage: {tmp / 'out'}\ninbox_sensor: false\n")
        env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config)}
        port, log = free_port(), open(tmp / "web.log", "w")
        web = start_webserver(workspace_file(tmp / "workspace.yaml"), env, log, port)
        try:
            wait_up(port)
            url = f"http://127.0.0.1:{port}/assets/slide_file?view=partitions"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                times = [page_seconds(browser, url, n, RESULTS / f"ui_partitions_{n}.png") for _ in range(3)]
                browser.close()
        finally:
            stop(web)
            log.close()
        results[n] = {"first_s": times[0], "later_s": times[1:], "setup_s": setup}
        print(f"{n:>6} partitions: partitions page shows in {times[0]:.1f} s (first), "
              f"{min(times[1:]):.1f}-{max(times[1:]):.1f} s (again)")
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = sorted(results)
    if len(sizes) > 1:
        base, big = results[sizes[0]], results[sizes[-1]]
        print(f"{sizes[-1]} vs {sizes[0]} partitions: {big['first_s'] / base['first_s']:.2f} x (first load), "
              f"{min(big['later_s']) / min(base['later_s']):.2f} x (again)")
    save("ui", results)


if __name__ == "__main__":
    main()
