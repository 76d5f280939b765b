"""The inbox waits for a slide to finish arriving: settle time, temporary names, folder-based slides."""

import json
import os
import shutil
import time

import dagster as dg

from trident_assets.assets import qc_table
from trident_assets.definitions import build_definitions
from trident_assets.inbox import scan_inbox, settle
from trident_assets.io_managers import _write_local
from trident_assets.sensors import build_inbox_sensor
from trident_assets.settings import Settings


def _grow(path, data: bytes):
    with open(path, "ab") as f:
        f.write(data)


def test_settle_waits_until_nothing_changed_for_the_settle_time(tmp_path):
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x" * 10)
    waiting = {}
    ready, _ = settle(scan_inbox(str(tmp_path)), waiting, now=100, settle_seconds=30, give_up_seconds=600)
    assert ready == [] and "a.svs" in waiting  # first sight: it may still be growing
    _grow(slide, b"y" * 10)
    os.utime(slide, (200, 200))
    ready, _ = settle(scan_inbox(str(tmp_path)), waiting, now=125, settle_seconds=30, give_up_seconds=600)
    assert ready == []  # it changed: the clock starts again
    ready, _ = settle(scan_inbox(str(tmp_path)), waiting, now=150, settle_seconds=30, give_up_seconds=600)
    assert ready == []
    ready, _ = settle(scan_inbox(str(tmp_path)), waiting, now=156, settle_seconds=30, give_up_seconds=600)
    assert ready == ["a.svs"] and waiting == {}


def test_temporary_names_and_folder_slides(tmp_path):
    (tmp_path / "a.svs.part").write_bytes(b"x")
    (tmp_path / ".b.svs.tmp").write_bytes(b"x")
    (tmp_path / "c.svs.crdownload").write_bytes(b"x")
    (tmp_path / ".~d.svs").write_bytes(b"x")
    assert scan_inbox(str(tmp_path)) == {}
    os.rename(tmp_path / "a.svs.part", tmp_path / "a.svs")
    assert list(scan_inbox(str(tmp_path))) == ["a.svs"]

    (tmp_path / "m.mrxs").write_bytes(b"index")
    found = scan_inbox(str(tmp_path))
    assert not found["m.mrxs"].complete  # its data folder has not arrived
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"d" * 100)
    (tmp_path / "m" / "Data0001.dat.part").write_bytes(b"d")
    found = scan_inbox(str(tmp_path))
    assert not found["m.mrxs"].complete and "m__Data0000.dat" not in found
    os.rename(tmp_path / "m" / "Data0001.dat.part", tmp_path / "m" / "Data0001.dat")
    again = scan_inbox(str(tmp_path))
    assert again["m.mrxs"].complete and again["m.mrxs"].size == 5 + 101
    _grow(tmp_path / "m" / "Data0000.dat", b"more")  # a file of the set grows: the slide's fingerprint changes
    assert scan_inbox(str(tmp_path))["m.mrxs"].fingerprint != again["m.mrxs"].fingerprint

    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"d")
    (series / "2.dcm.part").write_bytes(b"d")
    found = scan_inbox(str(tmp_path))
    assert "series" in found and not found["series"].complete and "series__1.dcm" not in found


def test_sensor_waits_reports_a_slide_that_never_settles_once(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = Settings(inbox=str(inbox), storage=str(tmp_path / "out"))
    defs = build_definitions(settings)
    sensor = build_inbox_sensor(50, settle_seconds=0.6, give_up_seconds=1.5)
    (inbox / "m.mrxs").write_bytes(b"index")  # the data folder arrives last
    (inbox / "s.svs").write_bytes(b"x" * 10)
    with dg.instance_for_test() as instance:
        cursor, runs, reported = None, [], []

        def tick():
            nonlocal cursor
            result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources,
                                                    definitions=defs))
            cursor = result.cursor
            runs.extend(r.partition_key for r in result.run_requests)
            return result

        tick()
        assert runs == []  # nothing runs on first sight
        for _ in range(3):
            time.sleep(0.7)
            _grow(inbox / "s.svs", b"y")  # still being copied
            tick()
        assert runs == []
        time.sleep(0.7)
        tick()
        time.sleep(0.7)
        tick()
        assert runs == ["s.svs"]  # settled: one run
        table = qc_table(settings, defs.resources["trident_io"], [], instance)
        row = table.set_index("slide").loc["m.mrxs"]
        assert row["status"] == "arriving" and "m.mrxs" in row["error"]  # reported, not processed
        reported = list(defs.resources["trident_io"].arriving())
        tick()
        assert reported == ["m.mrxs"] and runs == ["s.svs"]

        (inbox / "m").mkdir()
        (inbox / "m" / "Data0000.dat").write_bytes(b"d")
        tick()
        time.sleep(0.7)
        tick()
        assert runs == ["s.svs", "m.mrxs"]  # once its data folder arrived and settled
        assert defs.resources["trident_io"].arriving() == {}
        assert len(cursor) < 2000


def test_sensor_cursor_holds_only_recent_changes(tmp_path):
    """The cursor forgets files that changed before its watermark, yet a file replaced in place, a copy that
    keeps an old modification time (cp -p), a link to an old file, an old file or folder moved in and a
    link's replaced target are still picked up; a file whose metadata alone changed is not run again."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    inbox.mkdir()
    elsewhere.mkdir()
    defs = build_definitions(Settings(inbox=str(inbox), storage=str(tmp_path / "out")))
    sensor = build_inbox_sensor(50, settle_seconds=0, late_seconds=1)
    for i in range(40):
        (inbox / f"old{i:02d}.svs").write_bytes(b"x" * 10)
    (elsewhere / "archived.svs").write_bytes(b"a" * 10)
    (elsewhere / "linked.svs").write_bytes(b"l" * 10)
    (elsewhere / "moved.svs").write_bytes(b"m" * 10)
    (elsewhere / "series").mkdir()  # a DICOM folder, moved in later
    (elsewhere / "series" / "1.dcm").write_bytes(b"d")
    os.utime(elsewhere / "archived.svs", (1e9, 1e9))  # scanned years ago
    with dg.instance_for_test() as instance:
        state = {"cursor": None}

        def tick() -> list[str]:
            result = sensor(dg.build_sensor_context(instance=instance, cursor=state["cursor"],
                                                    resources=defs.resources, definitions=defs))
            state["cursor"] = result.cursor
            if result.dynamic_partitions_requests:
                instance.add_dynamic_partitions("slides", result.dynamic_partitions_requests[0].partition_keys)
            keys = sorted(instance.get_dynamic_partitions("slides"))
            out = []
            for r in result.run_requests:
                start = r.partition_key or r.tags["dagster/asset_partition_range_start"]
                end = r.partition_key or r.tags["dagster/asset_partition_range_end"]
                out += keys[keys.index(start):keys.index(end) + 1]
            return sorted(out)

        assert len(tick()) == 40
        time.sleep(1.5)
        (inbox / "new.svs").write_bytes(b"n" * 10)
        assert tick() == ["new.svs"]
        assert "old00.svs" not in state["cursor"] and len(state["cursor"]) < 300  # the old files left it
        assert tick() == []  # nothing changed: nothing runs again

        time.sleep(1.5)
        _grow(inbox / "old07.svs", b"y")  # replaced in place
        shutil.copy2(elsewhere / "archived.svs", inbox / "archived.svs")  # keeps its 2001 modification time
        (inbox / "linked.svs").symlink_to(elsewhere / "linked.svs")
        os.rename(elsewhere / "moved.svs", inbox / "moved.svs")  # written long before, moved in now
        assert tick() == ["archived.svs", "linked.svs", "moved.svs", "old07.svs"]
        assert tick() == []
        assert len(state["cursor"]) < 300

        io = defs.resources["trident_io"]
        for k, sf in scan_inbox(str(inbox)).items():  # what each slide's slide_file recorded when it ran
            _write_local(io.file_for(["slide_file"], k, None), sf)
        time.sleep(1.5)
        os.chmod(inbox / "old03.svs", 0o600)  # its change time moves, its contents do not
        os.rename(elsewhere / "series", inbox / "series")  # a folder moved in: its file keeps its old change time
        (elsewhere / "linked.svs").write_bytes(b"L" * 10)  # a link's target replaced
        assert tick() == ["linked.svs", "series"]

        old_format = json.dumps({"seen": {k: sf.fingerprint for k, sf in scan_inbox(str(inbox)).items()},
                                 "waiting": {}})
        state["cursor"] = old_format  # the cursor of the previous version: nothing runs again
        assert tick() == []
        (inbox / "offline").mkdir()  # the share unmounted: an empty listing keeps the cursor
        empty = build_inbox_sensor(50, settle_seconds=0)
        defs_empty = build_definitions(Settings(inbox=str(inbox / "offline"), storage=str(tmp_path / "out")))
        result = empty(dg.build_sensor_context(instance=instance, cursor=state["cursor"],
                                               resources=defs_empty.resources, definitions=defs_empty))
        assert result.cursor == state["cursor"] and not result.run_requests
