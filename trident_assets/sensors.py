"""The inbox sensor (new or replaced slide files -> partitions + runs) and the automation sensor."""


import json

import dagster as dg

from .assets import Inbox, slides
from .inbox import redact


def build_inbox_sensor(job, max_per_tick: int) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Registers new slide files as partitions and requests their runs in the same tick.")
    def inbox_sensor(context: dg.SensorEvaluationContext, inbox: Inbox):
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        found = inbox.scan()
        # New files and replaced files (their fingerprint changed); a file that fails is not retried until
        # it changes, because its fingerprint is remembered like any other.
        todo = sorted(k for k, sf in found.items() if seen.get(k) != sf.fingerprint)
        batch = todo[:max_per_tick]
        if not batch:
            return dg.SkipReason(f"no new slides in {redact(inbox.path)} ({len(found)} known)")
        known = set(context.instance.get_dynamic_partitions(slides.name))
        new = [k for k in batch if k not in known]
        runs = [dg.RunRequest(run_key=f"{k}:{found[k].fingerprint}", partition_key=k,
                              tags={"trident/slide_file": found[k].relpath[:200]}) for k in batch]
        for k in batch:
            seen[k] = found[k].fingerprint
        context.log.info(f"{len(batch)} slide(s) to process ({len(new)} new); {len(todo) - len(batch)} left "
                         f"for the next tick")
        return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=[slides.build_add_request(new)]
                               if new else [], cursor=json.dumps(seen))

    return inbox_sensor


def build_automation_sensor() -> dg.AutomationConditionSensorDefinition:
    # The built-in automation sensor starts stopped; ours runs by default so eager assets follow upstream.
    return dg.AutomationConditionSensorDefinition("trident_automation", target=dg.AssetSelection.all(),
                                                  default_status=dg.DefaultSensorStatus.RUNNING,
                                                  minimum_interval_seconds=30)
