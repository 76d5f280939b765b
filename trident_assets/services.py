"""Starting and stopping a Dagster daemon and webserver from scripts and tests, and talking to the
webserver's GraphQL API (what the UI does)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from .settings import TEMPLATES

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance_home(folder: Path) -> Path:
    """A fresh DAGSTER_HOME with the default dagster.yaml and its storage created, so a daemon and a webserver
    started at once do not race to create the same SQLite tables."""
    import dagster as dg

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATES / "dagster.yaml", folder / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(folder)) as instance:
        instance.get_runs(limit=1)
    return folder


def workspace_file(path: Path) -> Path:
    path.write_text(f"load_from:\n  - python_module:\n      module_name: trident_assets\n"
                    f"      working_directory: {path.parent}\n")
    return path


def start(cmd: list[str], env: dict, log) -> subprocess.Popen:
    # Its own process group: dagster processes started from a script ignore SIGTERM from their parent,
    # so we stop the whole group.
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_daemon(workspace: Path, env: dict, log) -> subprocess.Popen:
    return start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, log)


def start_webserver(workspace: Path, env: dict, log, port: int) -> subprocess.Popen:
    return start([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)], env, log)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def graphql(port: int, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


LAUNCH_BACKFILL = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
BACKFILL_STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status } } }"""
BACKFILL_RUNS = """query($id: String!) { runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
  ... on Runs { results { runId status startTime endTime } } } }"""


def launch_backfill(port: int, assets: list[list[str]], partitions: list[str]) -> str:
    """Launch an asset backfill the way the UI does; returns its id."""
    res = graphql(port, LAUNCH_BACKFILL, {"p": {"assetSelection": [{"path": a} for a in assets],
                                                "partitionNames": partitions}})
    launched = res["data"]["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill not launched: {launched}")
    return launched["backfillId"]


def backfill_status(port: int, backfill_id: str) -> str | None:
    """The final status, or None while the backfill is still going."""
    status = graphql(port, BACKFILL_STATUS, {"id": backfill_id})["data"]["partitionBackfillOrError"]["status"]
    return None if status in ("REQUESTED", "CANCELING", "FAILING") else status


def backfill_runs(port: int, backfill_id: str) -> list[dict]:
    return graphql(port, BACKFILL_RUNS, {"id": backfill_id})["data"]["runsOrError"]["results"]
