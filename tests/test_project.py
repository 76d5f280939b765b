"""A lab's own project folder: init, settings resolved against it, a non-editable install, the slide cache."""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import dagster as dg
import fsspec
import pytest

from trident_assets import assets as assets_module
from trident_assets.cli import main
from trident_assets.definitions import build_definitions
from trident_assets.inbox import local_path, scan_inbox
from trident_assets.settings import Settings, load_settings

from conftest import ROOT, fixture_slide


def test_init_writes_a_project_that_every_command_uses(tmp_path, monkeypatch):
    project = tmp_path / "lab"
    assert main(["init", str(project)]) == 0
    config = (project / "trident.yaml").read_text()
    assert "fast_cpu" in config and "trust_remote_code" in config and "slide_cache_max_gb" in config
    assert "QueuedRunCoordinator" in (project / "dagster_home" / "dagster.yaml").read_text()
    (project / "trident.yaml").write_text(config.replace("inbox: data/inbox", "inbox: scans"))
    assert main(["init", str(project)]) == 0  # existing files are kept
    assert "inbox: scans" in (project / "trident.yaml").read_text()

    for var in ("TRIDENT_CONFIG", "TRIDENT_PROJECT", "DAGSTER_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(project)
    settings = load_settings()
    assert settings.resolve(settings.inbox) == str(project / "scans")
    assert settings.resolve(settings.storage) == str(project / "data" / "outputs")
    assert settings.holes_are_tissue is True  # TRIDENT's batch default
    (project / "trident.yaml").write_text("inbox: scans\n")  # keys left out keep their defaults
    assert load_settings().slide_encoders == Settings().slide_encoders != ()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("TRIDENT_PROJECT", str(project))
    assert load_settings().resolve("x") == str(project / "x")


def test_every_knob_reaches_the_assets(tmp_path):
    config = tmp_path / "trident.yaml"
    config.write_text("seg_batch_size: 4\nslide_cache_dir: cache\nslide_cache_max_gb: 0.5\n"
                      "patch_encoders:\n  - name: resnet50\n    fast_cpu: true\n    batch_size: 8\n"
                      "slide_encoders:\n  - name: titan\n    trust_remote_code: true\n"
                      "  - mean-resnet50\n")
    # titan needs conch_v15 features: the configuration names the patch encoder it needs
    with pytest.raises(ValueError, match="conch_v15"):
        load_settings(config)
    config.write_text(config.read_text().replace("  - name: resnet50\n", "  - name: conch_v15\n  - name: resnet50\n"))
    s = load_settings(config)
    resnet = next(pe for pe in s.patch_encoders if pe.name == "resnet50")
    assert resnet.fast_cpu and resnet.batch_size == 8 and s.seg_batch_size == 4
    assert next(se for se in s.slide_encoders if se.name == "titan").trust_remote_code
    inbox = build_definitions(s).resources["inbox"]
    assert inbox.cache_dir == str(tmp_path / "cache") and inbox.cache_max_gb == 0.5


def test_slide_cache_evicts_least_recently_used(tmp_path):
    fs = fsspec.filesystem("memory")
    for name in ("a", "b", "c", "d"):
        fs.pipe(f"/cache-inbox/{name}.svs", b"x" * 1000)
    found = scan_inbox("memory://cache-inbox")
    cache = tmp_path / "cache"
    a = local_path(found["a.svs"], str(cache), max_bytes=2500)
    time.sleep(0.05)
    b = local_path(found["b.svs"], str(cache), max_bytes=2500)
    time.sleep(0.05)
    assert local_path(found["a.svs"], str(cache), max_bytes=2500) == a  # a hit: a is now the newest
    time.sleep(0.05)
    c = local_path(found["c.svs"], str(cache), max_bytes=2500)
    assert os.path.exists(a) and os.path.exists(c) and not os.path.exists(b)
    assert Path(a).read_bytes() == b"x" * 1000
    # A step's slides, open together, stay even past the limit (the features step opens them all first).
    time.sleep(0.05)
    step = [found["b.svs"], found["c.svs"], found["d.svs"]]
    assert all(os.path.exists(local_path(s, str(cache), max_bytes=2500, in_use=step)) for s in step)
    assert all(os.path.exists(p) for p in (c, local_path(found["b.svs"], str(cache)))) and not os.path.exists(a)
    assert not list(cache.rglob("*.part"))


def test_otsu_takes_no_gpu_lease(tmp_path, monkeypatch, slides):
    """Otsu runs on the CPU: its step must not wait for (or hold) a GPU."""
    def no_lease(*a, **k):
        raise AssertionError("tissue_contours asked for a GPU lease")

    monkeypatch.setattr(assets_module, "lease_device", no_lease)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(slides["aperio_20x"], inbox / "s.svs")
    config = tmp_path / "trident.yaml"
    config.write_text(f"inbox: {inbox}\nstorage: {tmp_path / 'out'}\n")
    defs = build_definitions(load_settings(config))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("slides", ["s.svs"])
        result = dg.materialize([defs.get_assets_def("slide_file"), defs.get_assets_def("tissue_contours")],
                                partition_key="s.svs", instance=instance, resources=defs.resources)
        assert result.success


def test_non_editable_install_runs_from_the_labs_folder(tmp_path):
    """`pip install .` (no editable link to the repository), then init and a headless run in a folder outside
    the repository: configuration, instance and outputs all live in that folder."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The dependencies come from the test environment (a path entry, so its editable link is not loaded).
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q",
                              *map(str, wheels.glob("*.whl"))], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    lab = tmp_path / "lab"
    env = {k: v for k, v in os.environ.items() if k not in ("TRIDENT_CONFIG", "TRIDENT_PROJECT", "DAGSTER_HOME",
                                                            "PYTHONPATH")}
    cli = str(venv / "bin" / "trident-dagster")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import trident_assets; print(trident_assets.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert str(venv) in where and str(ROOT) not in where
    assert subprocess.run([cli, "init", str(lab)], env=env, cwd=tmp_path, timeout=300).returncode == 0
    (lab / "data" / "inbox").mkdir(parents=True)
    shutil.copy(fixture_slide("CMU-1-Small-Region.svs"), lab / "data" / "inbox" / "cmu.svs")
    run = subprocess.run([cli, "run", "--strict"], env=env, cwd=lab, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (lab / "data" / "outputs" / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
            / "cmu.svs.h5").exists()
    assert list((lab / "dagster_home").glob("*.db")) or (lab / "dagster_home" / "history").exists()
    status = subprocess.run([cli, "--project", str(lab), "status"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert status.returncode == 0 and "cmu.svs" in status.stdout and " ok " in f" {status.stdout} "
