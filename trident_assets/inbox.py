"""The inbox: where slide files arrive (a local folder or an fsspec URL), and the one place that maps a
slide key to its file."""

from __future__ import annotations

import csv
import io
import os
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


@dataclass(frozen=True)
class SlideFile:
    key: str
    path: str  # local path, or fsspec URL
    relpath: str
    size: int
    mtime: float
    mpp: float | None = None

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
    return name.lower().endswith(SUPPORTED_EXTENSIONS + KNOWN_UNSUPPORTED) and not name.startswith(".")


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

    def add(path: str, size: int, mtime: float):
        rel = os.path.relpath(path, base) if local else path[len(base):].lstrip("/")
        if wanted and not rel.lower().endswith(wanted):
            return
        key = slide_key(rel)
        url = path if local else f"{protocol}://{path}"
        mpp = mpps.get(rel, mpps.get(os.path.basename(rel)))
        found[key] = SlideFile(key, url, rel, int(size), float(mtime), mpp)

    for dirpath, dirnames, filenames in fs.walk(base, detail=True):
        dcm = [n for n in filenames if n.lower().endswith(".dcm")]
        if dirpath != base and dcm and len(dcm) == len([n for n in filenames if not n.startswith(".")]):
            infos = [filenames[n] for n in dcm]  # a DICOM series folder is one slide
            add(dirpath, sum(i.get("size", 0) for i in infos), max(_mtime(i) for i in infos))
            dirnames.clear()
            continue
        mrxs = {n.rsplit(".", 1)[0] for n in filenames if n.lower().endswith(".mrxs")}
        for d in list(dirnames):
            if d.lower().endswith(".zarr"):
                info = dirnames[d]
                add(info["name"] if not local else os.path.join(dirpath, d), 0, _tree_mtime(fs, info["name"]))
                del dirnames[d]
            elif d in mrxs:
                del dirnames[d]
        for n, info in filenames.items():
            if _is_slide_name(n):
                add(info["name"] if not local else os.path.join(dirpath, n), info.get("size", 0), _mtime(info))
    return found


def _mtime(info: dict) -> float:
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is not None:
            return v.timestamp() if hasattr(v, "timestamp") else float(v)
    return 0.0


def _tree_mtime(fs, path: str) -> float:
    return max([_mtime(i) for i in fs.find(path, detail=True).values()] or [0.0])


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


def local_path(slide: SlideFile, cache_dir: str, max_bytes: int | None = None) -> str:
    """A local file for readers that need one (OpenSlide): remote slides are copied once into a cache that
    keeps at most ``max_bytes``, evicting the least recently used copies."""
    if "://" not in slide.path or slide.path.startswith("file://"):
        return slide.path.removeprefix("file://")
    entry = os.path.join(cache_dir, slide.key, slide.fingerprint)
    target = os.path.join(entry, os.path.basename(slide.relpath))
    if not os.path.exists(target):
        fs, path = fsspec.core.url_to_fs(slide.path)
        os.makedirs(entry, exist_ok=True)
        fs.get(path, target + ".part", recursive=fs.isdir(path))
        os.replace(target + ".part", target)
    os.utime(entry)  # the entry's mtime is its last use
    if max_bytes is not None:
        evict_cache(cache_dir, max_bytes, keep=entry)
    return target


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def evict_cache(cache_dir: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Delete the least recently used cached slides until the cache holds at most ``max_bytes``; the entry
    in use (``keep``) stays. A reader that still has an evicted file open keeps reading it (POSIX)."""
    entries = [os.path.join(cache_dir, k, f) for k in os.listdir(cache_dir)
               for f in os.listdir(os.path.join(cache_dir, k))]
    sizes = {e: _tree_bytes(e) for e in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=os.path.getmtime):
        if total <= max_bytes:
            break
        if entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
    return removed
