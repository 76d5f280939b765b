"""What a Celery worker runs. A CPU worker and a worker per GPU:

    celery -A trident_assets.celery_app worker -Q dagster -n cpu@%h
    CUDA_VISIBLE_DEVICES=0 celery -A trident_assets.celery_app worker -Q gpu -n gpu0@%h -P solo

The worker is long-lived: the encoders its steps load stay in memory between steps (trident_lib.model_cache).
It needs the same environment as the runs: TRIDENT_CONFIG, DAGSTER_HOME and the database credentials that
dagster.yaml reads, and TRIDENT_CELERY_BROKER.
"""

from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from .scaleout import celery_app
from .settings import load_settings

app = celery_app(load_settings())
execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
