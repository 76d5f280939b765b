"""The executor a run uses, chosen by the ``executor`` setting of trident.yaml, and the Celery settings the
run (which sends steps) and the workers (which run them) share.

- ``in_process`` (default): all steps of a run in the run's process; the embedded setting.
- ``celery``: each step is a Celery task. Steps tagged ``dagster-celery/queue: gpu`` (patch features, slide
  embeddings) go to the ``gpu`` queue, whose workers each own one GPU; every other step goes to the default
  ``dagster`` queue. Broker and result backend: ``$TRIDENT_CELERY_BROKER`` (for example
  ``redis://:password@redis:6379/0``), read when a run starts and when a worker starts.
- ``k8s``: each step is a Kubernetes job (dagster-k8s); GPU steps ask for a GPU through their
  ``dagster-k8s/config`` tag.
"""

from __future__ import annotations

import os

import dagster as dg

from .settings import Settings

BROKER_ENV = "TRIDENT_CELERY_BROKER"
CPU_QUEUE = "dagster"  # dagster-celery's default queue
GPU_QUEUE = "gpu"


def celery_config_source(settings: Settings) -> dict:
    """Celery settings beyond broker and backend, the same for the run and the workers."""
    return {
        # A step is acknowledged only once it has finished, so the step of a worker that dies (SIGKILL, node
        # lost) stays on the broker and is handed to another worker after the visibility timeout.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # a busy GPU worker does not hold back steps another could run
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Longer than the slowest step: Redis hands out again any step unacknowledged for this long.
            "visibility_timeout": int(settings.celery_visibility_timeout),
            # Look for abandoned steps every 10 s (kombu's default scans every 100 s).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # dagster-celery's defaults for publishing retries
            "max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        },
    }


def executor_def(settings: Settings) -> dg.ExecutorDefinition:
    if settings.executor == "celery":
        from dagster_celery import celery_executor

        broker = {"env": BROKER_ENV}  # resolved when the run starts: credentials stay in the environment
        return celery_executor.configured({"broker": broker, "backend": broker,
                                           "config_source": celery_config_source(settings)})
    if settings.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    # One process per run: a step in its own process re-imports torch and the models (~5 s each);
    # parallelism comes from several runs at once and from the data-loader workers inside a step.
    return dg.in_process_executor


def celery_app(settings: Settings):
    """The Celery app a worker runs (``celery -A trident_assets.celery_app worker``), built the way
    dagster-celery builds the run's, with the same settings."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app

    broker = os.environ.get(BROKER_ENV)
    if not broker:
        raise RuntimeError(f"set {BROKER_ENV} to the broker URL (e.g. redis://:password@redis-host:6379/0)")
    return make_app(CeleryExecutor.for_cli(broker=broker, backend=broker,
                                           config_source=celery_config_source(settings)).app_args())
