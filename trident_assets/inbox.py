"""The inbox: where slide files arrive (a local folder or an fsspec URL), and the one place that maps a
slide key to its file."""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
import shutil
from dataclasses import asdict, dataclass

import fsspec

from trident_lib.readers import SUPPORTED_EXTENSIONS

from .keys import slide_key

# Extensions of slide formats we do not read: they still become partitions, so the lab sees a clear
# "unsupported format" failure for them instead of a file silently ignored.
KNOWN_UNSUPPORTED = (".vsi", ".qptiff", ".isyntax", ".kfb", ".tmap", ".mds")
SLIDE_LIST = "slides.csv"  # optional: columns wsi (file name or relative path) and mpp
# Names that copy tools give files while they are still being written; ignored until renamed.
TEMP_NAME = re.compile(r"^\.|^~\$|\.(part|partial|tmp|crdownload|download|filepart)$", re.IGNORECASE)


@dataclass(frozen=True)
class SlideFile:
    key: str
    path: str  # local path, or fsspec URL
    relpath: str
    size: int
    mtime: float
    mpp: float | None = None
    complete: bool = True  # False while a part of the slide is missing or still has a temporary name
    changed: float = 0.0  # when the file last changed by the share's clock (ctime: copies cannot set it)

    @property
    def name(self) -> str:
        return os.path.basename(self.relpath)

    @property
    def fingerprint(self) -> str:
        """Changes when the file is replaced (size or modification time)."""
        return f"{self.size}-{int(self.mtime * 1000)}"

    def to_dict(self) -> dict:
        return asdict(self)


def redact(url: str) -> str:
    """Hide credentials written into a URL (``s3://key:secret@bucket``) before it reaches logs or metadata."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]+@", r"\1***@", str(url))


def _is_slide_name(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_EXTENSIONS + KNOWN_UNSUPPORTED) and not TEMP_NAME.search(name)


def scan_inbox(root: str, extensions: tuple[str, ...] = ()) -> dict[str, SlideFile]:
    """Every slide under ``root`` by key. Folders that are one slide (OME-Zarr, DICOM series) count once;
    the data folder beside an .mrxs file is not searched."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        return {}
    protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
    local = protocol in ("file", "local")
    wanted = tuple(e.lower() for e in extensions) or None
    mpps = _slide_list_mpps(fs, base)
    found: dict[str, SlideFile] = {}

    def add(path: str, size: int, mtime: float, changed: float, complete: bool = True):
        rel = os.path.relpath(path, base) if local else path[len(base):].lstrip("/")
        if wanted and not rel.lower().endswith(wanted):
            return
        key = slide_key(rel)
        url = path if local else f"{protocol}://{path}"
        mpp = mpps.get(rel, mpps.get(os.path.basename(rel)))
        found[key] = SlideFile(key, url, rel, int(size), float(mtime), mpp, complete, float(changed))

    def full(dirpath: str, name: str, info: dict) -> str:
        return os.path.join(dirpath, name) if local else info["name"]

    for dirpath, dirnames, filenames in fs.walk(base, detail=True):
        real = [n for n in filenames if not TEMP_NAME.search(n)]
        dcm = [n for n in real if n.lower().endswith(".dcm")]
        if dirpath != base and dcm and len(dcm) == len(real):
            infos = [filenames[n] for n in filenames]  # a DICOM series folder is one slide
            add(dirpath, sum(i.get("size", 0) for i in infos), max(_mtime(i) for i in infos),
                max(_changed(i) for i in infos), complete=len(real) == len(filenames))
            dirnames.clear()
            continue
        mrxs = {n.rsplit(".", 1)[0]: n for n in real if n.lower().endswith(".mrxs")}
        for d in list(dirnames):
            if d.lower().endswith(".zarr"):
                add(full(dirpath, d, dirnames[d]), *_tree(fs, dirnames[d]["name"]))
                del dirnames[d]
            elif d in mrxs:
                del dirnames[d]
        for n in real:
            if not _is_slide_name(n):
                continue
            info = filenames[n]
            if n in mrxs.values():  # the slide is the .mrxs file and its data folder: wait for both
                data = posixpath.join(dirpath, n.rsplit(".", 1)[0])
                size, mtime, changed, complete = _tree(fs, data) if fs.isdir(data) else (0, 0.0, 0.0, False)
                add(full(dirpath, n, info), info.get("size", 0) + size, max(_mtime(info), mtime),
                    max(_changed(info), changed), complete)
            else:
                add(full(dirpath, n, info), info.get("size", 0), _mtime(info), _changed(info))
    return found


def settle(found: dict[str, SlideFile], waiting: dict[str, list], now: float, settle_seconds: float,
           give_up_seconds: float) -> tuple[list[str], list[str]]:
    """Which of ``found`` (the slides not processed in their current state) have finished arriving.

    A slide is ready once it is complete and its size and modification time (of every file in the set)
    have not changed for ``settle_seconds``, observed here rather than read off the file clock, so a share
    whose clock differs cannot fool it. ``waiting`` (key -> [fingerprint, unchanged since, first seen,
    reported]) is updated in place and only holds slides still arriving. Returns (ready keys, keys that
    have been arriving for over ``give_up_seconds`` and are reported now, once)."""
    ready, stuck = [], []
    for key in list(waiting):
        if key not in found:  # deleted or renamed while arriving (a .part renamed to .svs, say)
            del waiting[key]
    for key, sf in sorted(found.items()):
        state = waiting.setdefault(key, [sf.fingerprint, now, now, False])
        if state[0] != sf.fingerprint:
            state[0], state[1] = sf.fingerprint, now
        if sf.complete and now - state[1] >= settle_seconds:
            ready.append(key)
            del waiting[key]
        elif now - state[2] > give_up_seconds and not state[3]:
            state[3] = True
            stuck.append(key)
    return ready, stuck


def _mtime(info: dict) -> float:
    if info.get("islink"):  # a link's own modification time says nothing of its slide
        try:
            return os.stat(info["name"]).st_mtime
        except OSError:
            pass
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is not None:
            return v.timestamp() if hasattr(v, "timestamp") else float(v)
    return 0.0


def _changed(info: dict) -> float:
    """When a file last changed by the file server's clock. Locally that is the ctime (of a link and of its
    target, whichever is newer), which copies that keep the modification time (cp -p, rsync -a) and moves
    still advance; elsewhere the store's last-modified time, which the server sets on upload."""
    if "ino" not in info:  # not a local file
        return _mtime(info)
    try:  # fsspec's "created" is the birth time where there is one, and a link's own times
        stamp = os.stat(info["name"]).st_ctime
    except OSError:  # a dangling link, or deleted since the listing
        return info.get("created") or 0.0
    return max(stamp, os.lstat(info["name"]).st_ctime) if info.get("islink") else stamp


def _tree(fs, path: str) -> tuple[int, float, float, bool]:
    """Total size, newest modification and change times, and whether no file in the folder has a
    temporary name."""
    infos = fs.find(path, detail=True).values()
    return (sum(i.get("size", 0) for i in infos), max([_mtime(i) for i in infos] or [0.0]),
            max([_changed(i) for i in infos] or [0.0]),
            not any(TEMP_NAME.search(posixpath.basename(i["name"])) for i in infos))


def _slide_list_mpps(fs, base: str) -> dict[str, float]:
    path = f"{base.rstrip('/')}/{SLIDE_LIST}"
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    out = {}
    for row in rows:
        if row.get("wsi") and row.get("mpp"):
            out[row["wsi"].strip()] = float(row["mpp"])
    return out


def local_path(slide: SlideFile, cache_dir: str, max_bytes: int | None = None, in_use=()) -> str:
    """A local file for readers that need one (OpenSlide): remote slides are copied once into a cache that
    keeps at most ``max_bytes``, evicting the least recently used copies, but never the slides ``in_use``
    (a step's slides, open together)."""
    if "://" not in slide.path or slide.path.startswith("file://"):
        return slide.path.removeprefix("file://")
    entry = _cache_entry(slide, cache_dir)
    target = os.path.join(entry, os.path.basename(slide.relpath))
    if not os.path.exists(target):
        fs, path = fsspec.core.url_to_fs(slide.path)
        os.makedirs(entry, exist_ok=True)
        fs.get(path, target + ".part", recursive=fs.isdir(path))
        os.replace(target + ".part", target)
    os.utime(entry)  # the entry's mtime is its last use
    if max_bytes is not None:
        evict_cache(cache_dir, max_bytes, keep={entry, *(_cache_entry(other, cache_dir) for other in in_use)})
    return target


def _cache_entry(slide: SlideFile, cache_dir: str) -> str:
    return os.path.join(cache_dir, slide.key, slide.fingerprint)


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def evict_cache(cache_dir: str, max_bytes: int, keep=()) -> list[str]:
    """Delete the least recently used cached slides until the cache holds at most ``max_bytes``; the entries
    in use (``keep``) stay. A reader that still has an evicted file open keeps reading it (POSIX)."""
    entries = [os.path.join(cache_dir, k, f) for k in os.listdir(cache_dir)
               for f in os.listdir(os.path.join(cache_dir, k))]
    sizes = {e: _tree_bytes(e) for e in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=os.path.getmtime):
        if total <= max_bytes:
            break
        if entry in keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
    return removed
