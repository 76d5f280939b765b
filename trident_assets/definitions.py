"""The code location: assets, checks, jobs, sensors and resources built from the lab's settings."""

from __future__ import annotations

import dagster as dg

from . import dagster_fixes
from .assets import PER_SLIDE, Inbox, build_assets
from .io_managers import TridentIOManager
from .scaleout import executor_def
from .sensors import build_automation_sensor, build_inbox_sensor
from .settings import Settings, load_settings


def build_definitions(settings: Settings | None = None, resources: dict | None = None) -> dg.Definitions:
    """``resources`` replaces the default ones (for example a different inbox in tests)."""
    dagster_fixes.apply()
    settings = settings or load_settings()
    assets = build_assets(settings)
    process_slides = dg.define_asset_job("process_slides", selection=PER_SLIDE,
                                         description="Every per-slide asset for the selected slides.")
    cohort = dg.define_asset_job("refresh_cohort_tables", selection=dg.AssetSelection.groups("cohort"))
    return dg.Definitions(
        assets=assets,
        # The `executor` setting: in-process (embedded), Celery workers with a GPU queue, or Kubernetes jobs.
        executor=executor_def(settings),
        jobs=[process_slides, cohort],
        sensors=[build_inbox_sensor(settings.slides_per_run, settings.inbox_settle_seconds,
                                    running=settings.inbox_sensor, backfill_above=settings.backfill_above_slides),
                 build_automation_sensor()],
        resources={
            "inbox": Inbox(path=settings.resolve(settings.inbox), extensions=list(settings.extensions),
                           cache_dir=settings.resolve(settings.slide_cache_dir),
                           cache_max_gb=settings.slide_cache_max_gb),
            "trident_io": TridentIOManager(base_path=settings.resolve(settings.storage)),
            **(resources or {}),
        },
    )
