"""The inbox sensor (new or replaced slide files -> partitions + runs) and the automation sensor."""


import hashlib
import json
import time

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset  # backfill requests
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from .assets import PER_SLIDE, Inbox, slides
from .inbox import redact, settle
from .io_managers import TridentIOManager
from .settings import Settings

ARRIVING_REPORT_SECONDS = 30 * 60  # a file still changing after this long is reported (once), not processed
LATE_LISTING_SECONDS = 300  # how late a changed file may show in the inbox's listing and still be seen


def build_inbox_sensor(slides_per_run: int, settle_seconds: float,
                       give_up_seconds: float = ARRIVING_REPORT_SECONDS, running: bool = True,
                       late_seconds: float = LATE_LISTING_SECONDS,
                       backfill_above: int = Settings.backfill_above_slides) -> dg.SensorDefinition:
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    # Targets assets, not a job: a sensor may request backfills only then.
    @dg.sensor(asset_selection=PER_SLIDE, minimum_interval_seconds=15, default_status=status,
               description="Registers new slide files as partitions once they have finished arriving, and "
                           "requests their runs in the same tick, several slides per run (a big drop: one "
                           "backfill).")
    def inbox_sensor(context: dg.SensorEvaluationContext, inbox: Inbox,
                     trident_io: dg.ResourceParam[TridentIOManager]):
        # The cursor stays small: files that changed before "since" (by the share's clock) were handled in
        # earlier ticks, so it only holds the fingerprints of files changed after it, and slides arriving.
        cursor = json.loads(context.cursor) if context.cursor else {}
        since: float = cursor.get("since", 0.0)
        recent: dict[str, str] = cursor.get("recent", cursor.get("seen", {}))  # "seen": the older cursor
        waiting: dict[str, list] = cursor.get("waiting", {})
        found, now = inbox.scan(), time.time()
        if not found and (recent or waiting):  # an unmounted share lists as empty: forget nothing
            return dg.SensorResult(skip_reason=f"no slides in {redact(inbox.path)}", cursor=context.cursor)
        known = set(context.instance.get_dynamic_partitions(slides.name))
        # New and replaced files; a file that fails is not retried until it changes. A file that is not a
        # partition yet counts whatever its time (a folder moved in keeps its files' times).
        changed = {k: sf for k, sf in found.items()
                   if (sf.changed >= since or k in waiting or k not in known) and recent.get(k) != sf.fingerprint}
        for k in [k for k in changed if k in known and k not in waiting and k not in recent]:
            # changed after "since" but not since it was processed (chmod, a new hard link): not replaced
            if trident_io.recorded_fingerprint(k) == changed[k].fingerprint:
                recent[k] = changed.pop(k).fingerprint
        ready, stuck = settle(changed, waiting, now, settle_seconds, give_up_seconds)
        for k in stuck:
            message = (f"{found[k].relpath}: still arriving after {give_up_seconds / 60:.0f} min (its size or "
                       f"modification time keeps changing, or a part of it is missing); not processed yet.")
            context.log.warning(message)
            trident_io.mark_arriving(k, message)
        recent.update({k: found[k].fingerprint for k in ready})
        # A listing can show a changed file late (NFS caches directories), so "since" trails the newest
        # change seen by late_seconds, and catches up with it once that change is late_seconds old here.
        # A time over a day ahead of ours is a wrong clock, not a change: it would stall "since".
        newest = cursor.get("newest", [0.0, now])
        latest = max((sf.changed for sf in found.values() if sf.changed < now + 86400), default=0.0)
        if latest > newest[0]:
            newest = [latest, now]
        since = max(since, newest[0] - (late_seconds if now - newest[1] < late_seconds else 0))
        recent = {k: fp for k, fp in recent.items() if k in found and found[k].changed >= since}
        new_cursor = json.dumps({"since": since, "newest": newest, "recent": recent, "waiting": waiting},
                                separators=(",", ":"))
        if not ready:
            return dg.SensorResult(skip_reason=f"no new slides ready in {redact(inbox.path)} ({len(found)} known, "
                                               f"{len(waiting)} arriving)", cursor=new_cursor)
        new = [k for k in ready if k not in known]
        replaced = [k for k in ready if k in known]
        if len(ready) > backfill_above:
            # The daemon takes seconds to create each run (planned events per slide and asset): a big drop is
            # one backfill, requested now, whose runs of slides_per_run the backfill daemon creates.
            runs = [_backfill(new + replaced, PER_SLIDE.resolve(context.repository_def.asset_graph))]
            how = "one backfill"
        else:
            runs = [_range_run(chunk, found) for chunk in _chunks(new, slides_per_run)]
            runs += [_range_run([k], found) for k in replaced]  # replaced files: one run each
            how = f"{len(runs)} run(s)"
        for k in ready:
            trident_io.clear_arriving(k)
        context.log.info(f"{len(ready)} slide(s) to process ({len(new)} new) in {how}; "
                         f"{len(waiting)} still arriving")
        return dg.SensorResult(run_requests=runs, dynamic_partitions_requests=[slides.build_add_request(new)]
                               if new else [], cursor=new_cursor)

    return inbox_sensor


def _chunks(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def _range_run(keys: list[str], found: dict) -> dg.RunRequest:
    """One run over consecutive partitions (new keys are added in this order, so they are consecutive): a
    model loads once per run, not once per slide."""
    if len(keys) == 1:
        return dg.RunRequest(run_key=f"{keys[0]}:{found[keys[0]].fingerprint}", partition_key=keys[0],
                             tags={"trident/slide_file": found[keys[0]].relpath[:200]})
    digest = hashlib.sha256("".join(f"{k}:{found[k].fingerprint}" for k in keys).encode()).hexdigest()[:16]
    return dg.RunRequest(run_key=f"{keys[0]}..{keys[-1]}:{digest}",
                         tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1],
                               "trident/slides": str(len(keys))})


def _backfill(keys: list[str], asset_keys) -> dg.RunRequest:
    subset = slides.empty_subset().with_partition_keys(keys)
    graph_subset = AssetGraphSubset(partitions_subsets_by_asset_key={k: subset for k in asset_keys})
    # The backfill's tags go on each of its runs: name the drop's size, not the run's.
    return dg.RunRequest.for_asset_graph_subset(graph_subset, tags={"trident/drop_slides": str(len(keys))})


def build_automation_sensor() -> dg.AutomationConditionSensorDefinition:
    # The built-in automation sensor starts stopped; ours runs by default so eager assets follow upstream.
    return dg.AutomationConditionSensorDefinition("trident_automation", target=dg.AssetSelection.all(),
                                                  default_status=dg.DefaultSensorStatus.RUNNING,
                                                  minimum_interval_seconds=30)
