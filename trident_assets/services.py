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


def instance_home(folder: Path, config: Path = TEMPLATES / "dagster.yaml") -> Path:
    """A fresh DAGSTER_HOME with ``config`` as its dagster.yaml (default: the embedded SQLite one) and its
    storage created, so a daemon and a webserver started at once do not race to create the same tables.
    Environment variables that ``config`` reads (database credentials) must be set."""
    import dagster as dg

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, folder / "dagster.yaml")
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


# -- PostgreSQL, Redis and Celery workers on this machine: the scale-out setting for tests and benchmarks -----

SCALEOUT_INSTANCE = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"  # Postgres, env credentials


def _run_as(user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--"] if user else []


def postgres_bin() -> Path:
    """Debian's server binaries (apt-get install postgresql) or any on PATH."""
    found = shutil.which("postgres")
    candidates = [Path(found).parent] if found else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if (folder / "postgres").exists() and (folder / "initdb").exists():
            return folder
    raise RuntimeError("no PostgreSQL server binaries: install them (Debian: apt-get install postgresql)")


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 with a password-protected user; ``env`` holds what
    dagster.yaml reads. As root, the server runs as the ``postgres`` user (it refuses to run as root)."""

    def __init__(self, log, user: str = "dagster", password: str = "dagster-test-pw", db: str = "dagster"):
        import pwd
        import tempfile
        import time

        import psycopg2

        bindir = postgres_bin()
        owner = "postgres" if os.geteuid() == 0 else None
        # Its own folder outside pytest's (root-only) tree, so the postgres user can reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="trident-pg-"))
        (self.folder / "pw").write_text(password)
        if owner:
            try:
                entry = pwd.getpwnam(owner)
            except KeyError:
                raise RuntimeError("as root, PostgreSQL runs as the 'postgres' user, which is missing (Debian's "
                                   "postgresql package creates it)") from None
            for p in (self.folder, self.folder / "pw"):
                os.chown(p, entry.pw_uid, entry.pw_gid)
        data = self.folder / "data"
        subprocess.run(_run_as(owner) + [str(bindir / "initdb"), "-D", str(data), "-U", user, "-E", "UTF8",
                                         "--pwfile", str(self.folder / "pw"), "--auth-host=scram-sha-256",
                                         "--auth-local=scram-sha-256", "--no-sync"],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
        self.port = free_port()
        # Durability off: a test database; the dagster processes each open a few connections.
        self.proc = start(_run_as(owner) + [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                                            "-p", str(self.port), "-k", str(self.folder), "-c", "fsync=off",
                                            "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                                            "-c", "max_connections=300"], dict(os.environ), log)
        self.env = {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": user,
                    "DAGSTER_PG_PASSWORD": password, "DAGSTER_PG_DB": db}
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=user, password=password,
                                        dbname="postgres")
                break
            except psycopg2.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start (see the services log)") from None
                time.sleep(0.3)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()

    def stop(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


class Redis:
    """A throwaway Redis server on 127.0.0.1 with a password (Debian: apt-get install redis-server);
    ``url`` is the Celery broker URL."""

    def __init__(self, folder: Path, log, password: str = "redis-test-pw"):
        import time

        import redis

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("no redis-server: install it (Debian: apt-get install redis-server)")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = start([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", password,
                           "--save", "", "--appendonly", "no", "--dir", str(folder)], dict(os.environ), log)
        self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        client, deadline = redis.Redis.from_url(self.url), time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Redis did not start (see the services log)") from None
                time.sleep(0.2)

    def stop(self) -> None:
        stop(self.proc)


def start_celery_worker(name: str, queue: str, env: dict, log, cuda_device: str | None = None) -> subprocess.Popen:
    """One worker process on one queue, one step at a time (``-P solo``: the step runs in the worker process
    itself, which keeps its models between steps). A gpu-queue worker owns the device ``cuda_device``."""
    env = {**env, **({"CUDA_VISIBLE_DEVICES": cuda_device} if cuda_device is not None else {})}
    return start([str(BIN / "celery"), "-A", "trident_assets.celery_app", "worker", "-Q", queue, "-n", f"{name}@%h",
                  "-P", "solo", "--loglevel", "INFO", "--without-gossip", "--without-mingle"], env, log)
