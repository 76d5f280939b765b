"""Scale-out: the same code location on PostgreSQL and Celery workers (a CPU queue and a gpu queue), warm
models in long-lived workers, per-node GPU leases, and the Kubernetes deployment validated against
dagster-k8s's own config types.

The end-to-end test starts real services itself: PostgreSQL and Redis (Debian's postgresql and redis-server
packages, which .ci/run installs), a Dagster daemon, one CPU worker and one gpu-queue worker. A missing server
fails the test; it is never skipped. No GPU here: the gpu-queue worker runs its steps on the CPU."""

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pytest
import yaml

from trident_assets.services import (SCALEOUT_INSTANCE, Postgres, Redis, instance_home, start_celery_worker,
                                     start_daemon, stop, workspace_file)
from trident_assets.settings import load_settings
from trident_lib import model_cache

ROOT = Path(__file__).resolve().parents[1]
GPU_STEPS = ("patch_features", "slide_embeddings")
TIMINGS = ("seconds", "patches_per_second")  # provenance attributes that differ between any two runs


# -- configuration switch, warm models, GPU leases ------------------------------------------------------------

def _config(tmp_path, **extra) -> Path:
    path = tmp_path / "trident.yaml"
    body = {"inbox": str(tmp_path / "inbox"), "storage": str(tmp_path / "out"),
            "patch_encoders": [{"name": "efficientnet_lite0", "batch_size": 8}],
            "slide_encoders": ["mean-efficientnet_lite0"], **extra}
    path.write_text(yaml.safe_dump(body))
    return path


def test_executor_is_configuration(tmp_path, monkeypatch):
    from trident_assets.definitions import build_definitions

    monkeypatch.setenv("TRIDENT_CELERY_BROKER", "redis://:pw@127.0.0.1:1/0")
    embedded = build_definitions(load_settings(_config(tmp_path)))
    assert embedded.resolve_job_def("process_slides").executor_def.name == "in_process"
    celery = build_definitions(load_settings(_config(tmp_path, executor="celery", celery_visibility_timeout=60)))
    job = celery.resolve_job_def("process_slides")
    assert job.executor_def.name == "celery"
    queues = {node.name: node.tags.get("dagster-celery/queue", "dagster") for node in job.graph.node_defs}
    assert {n for n, q in queues.items() if q == "gpu"} == {"patch_features__efficientnet_lite0",
                                                            "slide_embeddings__mean_efficientnet_lite0"}
    assert queues["tissue_contours"] == queues["slide_file"] == "dagster"
    assert build_definitions(load_settings(_config(tmp_path, executor="k8s"))) \
        .resolve_job_def("process_slides").executor_def.name == "k8s"
    with pytest.raises(ValueError, match="executor must be one of"):
        load_settings(_config(tmp_path, executor="ray"))


def test_worker_app_shares_the_runs_settings(tmp_path, monkeypatch):
    from trident_assets.scaleout import celery_app

    monkeypatch.setenv("TRIDENT_CELERY_BROKER", "redis://:pw@127.0.0.1:1/0")
    app = celery_app(load_settings(_config(tmp_path, executor="celery", celery_visibility_timeout=90)))
    assert app.conf.broker_url == app.conf.result_backend == "redis://:pw@127.0.0.1:1/0"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.broker_transport_options["visibility_timeout"] == 90
    monkeypatch.delenv("TRIDENT_CELERY_BROKER")
    with pytest.raises(RuntimeError, match="TRIDENT_CELERY_BROKER"):
        celery_app(load_settings(_config(tmp_path, executor="celery")))


def test_model_cache_loads_once_per_name_weights_and_device(tmp_path, monkeypatch):
    model_cache.clear()
    monkeypatch.setenv("TRIDENT_MODEL_CACHE_SIZE", "2")
    built = []

    def build(tag):
        return lambda: built.append(tag) or object()

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    a, how, _ = model_cache.cached_model("patch", "enc", weights, "cpu", build("a"))
    b, how2, _ = model_cache.cached_model("patch", "enc", weights, "cpu", build("b"))
    assert (how, how2) == ("loaded", "reused") and a is b and built == ["a"]
    model_cache.cached_model("patch", "enc", weights, "cuda:0", build("c"))  # another device: another copy
    weights.write_bytes(b"other weights")  # new checksum: loaded again
    os.utime(weights, (time.time() + 5, time.time() + 5))
    _, how3, _ = model_cache.cached_model("patch", "enc", weights, "cpu", build("d"))
    assert how3 == "loaded" and built == ["a", "c", "d"]
    # Only two kept: the least recently used ("c", on cuda:0) was dropped.
    _, how4, _ = model_cache.cached_model("patch", "enc", weights, "cuda:0", build("e"))
    assert how4 == "loaded"
    model_cache.clear()


def test_gpu_lease_is_per_physical_gpu(tmp_path, monkeypatch):
    """Workers pinned with CUDA_VISIBLE_DEVICES each see their GPU as cuda:0; their leases must not collide,
    while two steps on the same GPU still exclude each other."""
    from trident_lib import devices

    monkeypatch.setattr(devices, "gpu_count", lambda: 1)
    monkeypatch.setattr(devices, "LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with devices.lease_device("auto") as a:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # another worker, another GPU, also "cuda:0"
        with devices.lease_device("auto", wait_seconds=0) as b:
            assert a == b == "cuda:0"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # the same GPU: taken
        with pytest.raises(TimeoutError), devices.lease_device("auto", wait_seconds=0, poll=0.01):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-2.lock", "gpu-3.lock"]


# -- Kubernetes: Helm values and the GPU op tags, checked with dagster-k8s's own config types -----------------

def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def test_helm_values_and_gpu_tags_fit_dagster_k8s(tmp_path):
    from dagster._config import validate_config
    from dagster_k8s import DagsterK8sJobConfig, K8sRunLauncher, k8s_job_executor
    from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config

    from trident_assets.definitions import build_definitions

    values = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    # The chart writes these keys into dagster.yaml's run_launcher config (camelCase -> snake_case); the
    # Kubernetes objects inside (volumes, mounts) keep their API spelling, which dagster-k8s accepts.
    top = {k: launcher[k] for k in ("jobNamespace", "loadInclusterConfig", "envConfigMaps", "envSecrets",
                                    "volumes", "volumeMounts") if launcher.get(k) is not None}  # ~ is left out
    config = {_snake(k): v for k, v in top.items()}
    config["env_config_maps"] = [c["name"] for c in config.get("env_config_maps", [])]
    config["env_secrets"] = [s["name"] for s in config.get("env_secrets", [])]
    result = validate_config(K8sRunLauncher.config_type(), {**config, "instance_config_map": "dagster-instance"})
    assert result.success, result.errors

    # The code location's trident.yaml in the chart selects the k8s_job_executor.
    deployment = values["dagster-user-deployments"]["deployments"][0]
    trident_yaml = yaml.safe_load((ROOT / "deploy" / "helm" / "trident.yaml").read_text())  # its ConfigMap
    assert trident_yaml["executor"] == "k8s"
    assert {"name": "TRIDENT_CONFIG", "value": "/etc/trident/trident.yaml"} in deployment["env"]
    (tmp_path / "trident.yaml").write_text(yaml.safe_dump({**trident_yaml, "inbox": str(tmp_path / "in"),
                                                           "storage": str(tmp_path / "out")}))
    job = build_definitions(load_settings(tmp_path / "trident.yaml")).resolve_job_def("process_slides")
    assert job.executor_def is k8s_job_executor
    assert validate_config(k8s_job_executor.config_schema.config_type, {"max_concurrent": 4}).success

    # The GPU steps' op tags become a step job with one GPU, on a GPU node; CPU steps ask for none.
    nodes = {n.name: n for n in job.graph.node_defs}
    for name, node in nodes.items():
        tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in node.tags.items()}
        user_config = get_user_defined_k8s_config(tags)  # validates against USER_DEFINED_K8S_JOB_CONFIG_SCHEMA
        k8s_job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="trident:test", dagster_home="/opt/dagster/dagster_home",
                                instance_config_map="dagster-instance"),
            args=["dagster", "api", "execute_step"], job_name="dagster-step-test", user_defined_k8s_config=user_config)
        pod = k8s_job.spec.template.spec
        resources = pod.containers[0].resources
        limits = (resources.limits or {}) if resources else {}
        if name.startswith(GPU_STEPS):
            assert limits.get("nvidia.com/gpu") == "1", name
            assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
            assert pod.tolerations[0].key == "nvidia.com/gpu"
            [shm] = [v for v in pod.volumes if v.empty_dir and v.empty_dir.medium == "Memory"]  # readers' batches
            assert {(m.name, m.mount_path) for m in pod.containers[0].volume_mounts} >= {(shm.name, "/dev/shm")}
        else:
            assert "nvidia.com/gpu" not in limits and not pod.tolerations, name


def test_compose_file_names_every_service():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "webserver", "daemon", "worker-cpu", "worker-gpu0", "worker-gpu1"} <= set(services)
    for i in (0, 1):
        gpu = services[f"worker-gpu{i}"]
        assert "-Q gpu" in " ".join(gpu["command"]) and gpu["environment"]["CUDA_VISIBLE_DEVICES"] == str(i)
        assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert gpu["environment"]["TRIDENT_CELERY_BROKER"].startswith("redis://")
        assert gpu["shm_size"] == "8gb"  # reader processes' batches; Docker's default 64 MB is too small
    assert "-Q dagster" in " ".join(services["worker-cpu"]["command"])


# -- end to end with real services -----------------------------------------------------------------------------

@pytest.fixture
def scaleout(tmp_path):
    """PostgreSQL + Redis + an instance on Postgres; yields the environment every process gets."""
    with open(tmp_path / "services.log", "w") as log:
        pg = Postgres(log)
        redis = None
        try:
            redis = Redis(tmp_path / "redis", log)
            env = {**os.environ, **pg.env, "TRIDENT_CELERY_BROKER": redis.url, "PYTHONUNBUFFERED": "1",
                   "TRIDENT_MODEL_CACHE_SIZE": "2"}
            os.environ.update(pg.env)  # the test reads the event log too
            env["DAGSTER_HOME"] = str(instance_home(tmp_path / "dagster_home", SCALEOUT_INSTANCE))
            yield env, log
        finally:
            for k in pg.env:
                os.environ.pop(k, None)
            if redis:
                redis.stop()
            pg.stop()


def _steps_by_worker(instance, run_ids) -> dict[str, set]:
    """step key -> the Celery workers that executed it, from dagster-celery's engine events."""
    out: dict[str, set] = {}
    for run_id in run_ids:
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            if "Executing steps" in e.message and e.step_key:
                worker = e.dagster_event.engine_event_data.metadata["Celery worker"].value
                out.setdefault(e.step_key, set()).add(worker)
    return out


def _model_logs(instance, run_ids) -> list[tuple[str, str, str]]:
    """(loaded | reused, model, worker host:pid) from the steps' logs."""
    out = []
    for run_id in run_ids:
        for e in instance.all_logs(run_id):
            if e.is_dagster_event or not e.user_message.startswith("model "):
                continue
            words = e.user_message.split()  # model loaded: NAME on DEVICE in worker HOST:PID (Ns)
            out.append((words[1].rstrip(":"), words[2], words[7]))
    return out


def _wait(what: str, condition, timeout: float, procs: dict, log_path: Path, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited:\n{log_path.read_text()[-4000:]}"
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()[-6000:]}")


def _read_h5(path: Path) -> tuple[dict, dict]:
    with h5py.File(path) as f:
        data = {name: f[name][()].tobytes() for name in f}
        attrs = {name: {k: str(v) for k, v in f[name].attrs.items()} for name in f}
        attrs["/"] = {k: str(v) for k, v in f.attrs.items()}
    return data, attrs


def _without_timings(attrs: dict) -> dict:
    return {obj: {k: v for k, v in values.items() if k not in TIMINGS} for obj, values in attrs.items()}


def test_celery_gpu_queue_end_to_end_and_worker_killed_mid_step(tmp_path, scaleout):
    """Six slides through the inbox sensor on Postgres + Celery; then the gpu worker is killed with SIGKILL
    in the middle of a feature step and replaced: the run completes and the slide's features are identical."""
    from trident_lib.synthetic import write_standard_slides

    env, log = scaleout
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    config = _config(tmp_path, executor="celery", celery_visibility_timeout=45, inbox_settle_seconds=1,
                     slides_per_run=1)  # one run per slide: six feature steps on the same worker
    env["TRIDENT_CONFIG"] = str(config)
    source = write_standard_slides(str(tmp_path / "src"), ["aperio_20x"])["aperio_20x"]
    workspace = workspace_file(tmp_path / "workspace.yaml")
    log_path = tmp_path / "services.log"
    procs = {"daemon": start_daemon(workspace, env, log),
             "cpu worker": start_celery_worker("cpu", "dagster", env, log),
             "gpu worker": start_celery_worker("gpu0", "gpu", env, log, cuda_device="0")}
    t0, instance = time.monotonic(), None
    try:
        for i in range(6):
            shutil.copy(source, inbox / f"slide_{i}.svs")
        features_dir = out / "20x_256px_0px_overlap" / "features_efficientnet_lite0"
        embeddings = out / "20x_256px_0px_overlap" / "slide_features_mean-efficientnet_lite0"
        instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])

        def slide_runs_done():
            runs = [r for r in instance.get_runs() if r.tags.get("dagster/sensor_name") == "inbox_sensor"]
            done = len(list(embeddings.glob("*.h5"))) == 6 and runs and all(r.is_finished for r in runs)
            return runs if done else None

        runs = _wait("six slide embeddings", slide_runs_done, 420, procs, log_path, poll=2)
        phase1 = time.monotonic() - t0
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
        for path in embeddings.glob("*.h5"):
            with h5py.File(path) as f:
                assert f["features"].shape == (1280,) and np.isfinite(f["features"][()]).all()

        # Steps went where their tags say: GPU steps only on the gpu-queue worker, the rest on the CPU worker.
        run_ids = [r.run_id for r in instance.get_runs()]
        by_worker = _steps_by_worker(instance, run_ids)
        gpu_steps = {k: w for k, w in by_worker.items() if k.startswith(GPU_STEPS)}
        assert len(gpu_steps) == 2 and all(w and all(x.startswith("gpu0@") for x in w) for w in gpu_steps.values())
        assert all(x.startswith("cpu@") for k, w in by_worker.items() if k not in gpu_steps for x in w)
        assert {"slide_file", "tissue_contours"} <= set(by_worker)
        # Warm worker: each model loaded once by the gpu worker, then reused for the other slides (and for
        # any run the automation sensor added).
        logs = _model_logs(instance, run_ids)
        assert sorted((how, model) for how, model, _ in logs if how == "loaded") == [
            ("loaded", "efficientnet_lite0"), ("loaded", "mean-efficientnet_lite0")], logs
        assert len([1 for how, m, _ in logs if how == "reused" and m == "efficientnet_lite0"]) >= 5, logs
        first_gpu_worker = {w for _, _, w in logs}
        assert len(first_gpu_worker) == 1

        # -- the gpu worker dies (SIGKILL) in the middle of a feature step ---------------------------------------
        victim = "slide_3.svs"
        reference = tmp_path / "reference.h5"
        shutil.copy(features_dir / f"{victim}.h5", reference)
        before = {r.run_id for r in instance.get_runs()}
        future = time.time() + 2
        os.utime(inbox / victim, (future, future))  # the file is replaced: the sensor asks for a new run

        def computing():  # the feature step of the new run has its model and is reading patches
            new = [r for r in instance.get_runs() if r.run_id not in before and
                   r.tags.get("dagster/partition") == victim]
            if not new:
                return None
            logs = _model_logs(instance, [new[0].run_id])
            return new[0].run_id if any(m == "efficientnet_lite0" for _, m, _ in logs) else None

        run_id = _wait("the new run's feature step", computing, 180, procs, log_path, poll=0.2)
        killed_at = time.monotonic()
        stop(procs.pop("gpu worker"))  # SIGKILL to the worker's process group
        step = "patch_features__efficientnet_lite0"
        successes = [e for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
                     if e.step_key == step]
        assert not successes, "the feature step finished before the worker was killed: kill earlier"
        procs["new gpu worker"] = start_celery_worker("gpu0", "gpu", env, log, cuda_device="0")

        def finished():
            run = instance.get_run_by_id(run_id)
            return run if run.is_finished else None

        run = _wait("the interrupted run", finished, 240, procs, log_path, poll=2)
        recovery = time.monotonic() - killed_at
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert not [r for r in instance.get_runs() if r.tags.get("dagster/parent_run_id") == run_id]  # no retry
        executions = [e for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                      if "Executing steps" in e.message and e.step_key == step]
        assert len(executions) == 2  # the killed worker's try, then the new worker's
        # The new worker finished the step, and it too loaded each model once, whichever run came first.
        finishers = {w for _, m, w in _model_logs(instance, [run_id]) if m == "efficientnet_lite0"}
        assert finishers - first_gpu_worker
        logs = _model_logs(instance, [r.run_id for r in instance.get_runs()])
        new_worker = {w for _, _, w in logs} - first_gpu_worker
        assert len(new_worker) == 1
        assert sorted(m for how, m, w in logs if how == "loaded" and w in new_worker) == [
            "efficientnet_lite0", "mean-efficientnet_lite0"], logs

        # No partial file anywhere; the features equal the uninterrupted run's, bit for bit.
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        data, attrs = _read_h5(features_dir / f"{victim}.h5")
        ref_data, ref_attrs = _read_h5(reference)
        assert data == ref_data
        assert _without_timings(attrs) == _without_timings(ref_attrs)
        print(f"\nscale-out e2e: six slides {phase1:.0f}s; worker killed -> run done {recovery:.0f}s "
              f"(visibility timeout 45s)")
    finally:
        for proc in procs.values():
            stop(proc)
        if instance is not None:
            instance.dispose()
