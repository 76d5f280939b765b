"""The inbox sensor (new or replaced slide files -> partitions + runs) and the automation sensor."""


import json
import time

import dagster as dg

from .assets import Inbox, slides
from .inbox import redact, settle
from .io_managers import TridentIOManager

ARRIVING_REPORT_SECONDS = 30 * 60  # a file still changing after this long is reported (once), not processed


def build_inbox_sensor(job, max_per_tick: int, settle_seconds: float,
                       give_up_seconds: float = ARRIVING_REPORT_SECONDS) -> dg.SensorDefinition:
    @dg.sensor(job=job, minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Registers new slide files as partitions once they have finished arriving, and "
                           "requests their runs in the same tick.")
    def inbox_sensor(context: dg.SensorEvaluationContext, inbox: Inbox,
                     trident_io: dg.ResourceParam[TridentIOManager]):
        cursor = json.loads(context.cursor) if context.cursor else {}
        seen: dict[str, str] = cursor.get("seen", {})
        waiting: dict[str, list] = cursor.get("waiting", {})
        found = inbox.scan()
        # New files and replaced files (their fingerprint changed); a file that fails is not retried until
        # it changes, because its fingerprint is remembered like any other.
        changed = {k: sf for k, sf in found.items() if seen.get(k) != sf.fingerprint}
        ready, stuck = settle(changed, waiting, time.time(), settle_seconds, give_up_seconds)
        for k in stuck:
            message = (f"{found[k].relpath}: still arriving after {give_up_seconds / 60:.0f} min (its size or "
                       f"modification time keeps changing, or a part of it is missing); not processed yet.")
            context.log.warning(message)
            trident_io.mark_arriving(k, message)
        batch = ready[:max_per_tick]
        now = time.time()
        for k in ready[max_per_tick:]:  # over the cap: settled already, the next tick takes them without waiting
            waiting[k] = [found[k].fingerprint, now - settle_seconds, now, False]
        new_cursor = json.dumps({"seen": {**seen, **{k: found[k].fingerprint for k in batch}}, "waiting": waiting})
        if not batch:
            return dg.SensorResult(skip_reason=f"no new slides ready in {redact(inbox.path)} ({len(found)} known, "
                                               f"{len(waiting)} arriving)", cursor=new_cursor)
        known = set(context.instance.get_dynamic_partitions(slides.name))
        new = [k for k in batch if k not in known]
        runs = [dg.RunRequest(run_key=f"{k}:{found[k].fingerprint}", partition_key=k,
                              tags={"trident/slide_file": found[k].relpath[:200]}) for k in batch]
        for k in batch:
            trident_io.clear_arriving(k)
        context.log.info(f"{len(batch)} slide(s) to process ({len(new)} new); {len(waiting)} still arriving")
        return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=[slides.build_add_request(new)]
                               if new else [], cursor=new_cursor)

    return inbox_sensor


def build_automation_sensor() -> dg.AutomationConditionSensorDefinition:
    # The built-in automation sensor starts stopped; ours runs by default so eager assets follow upstream.
    return dg.AutomationConditionSensorDefinition("trident_automation", target=dg.AssetSelection.all(),
                                                  default_status=dg.DefaultSensorStatus.RUNNING,
                                                  minimum_interval_seconds=30)
