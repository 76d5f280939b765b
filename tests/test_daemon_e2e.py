"""End to end: a real daemon and webserver; a slide dropped into the inbox becomes a slide embedding."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env, log):
    # Own process group: dagster processes ignore SIGTERM from a parent script; we stop the whole group.
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_inbox_to_embedding_with_daemon(tmp_path, slides):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    config = tmp_path / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {out}\npatch_encoders:\n  - name: efficientnet_lite0\n"
                      f"    batch_size: 16\nslide_encoders:\n  - mean-efficientnet_lite0\n")
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(f"load_from:\n  - python_module:\n      module_name: trident_assets\n"
                         f"      working_directory: {ROOT}\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "TRIDENT_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    log = open(tmp_path / "services.log", "w")
    daemon = start([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env, log)
    web = start([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)], env, log)
    try:
        shutil.copy(slides["aperio_20x"], inbox / "new scan.svs")
        target = out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
        deadline = time.time() + 420
        while time.time() < deadline and not (target.exists() and any(target.glob("*.h5"))):
            assert daemon.poll() is None, (tmp_path / "services.log").read_text()[-3000:]
            time.sleep(3)
        files = list(target.glob("*.h5")) if target.exists() else []
        assert files, "no slide embedding after 7 minutes:\n" + (tmp_path / "services.log").read_text()[-5000:]
        assert files[0].name.startswith("new_scan-") and files[0].name.endswith(".svs.h5")
        with h5py.File(files[0]) as f:
            assert f["features"].shape == (1280,)

        nodes = graphql(port, "{ assetNodes { assetKey { path } } }")["data"]["assetNodes"]
        paths = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {"slide_file", "tissue_contours", "slide_embeddings/mean-efficientnet_lite0"} <= paths
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop(web)
        stop(daemon)
        log.close()
