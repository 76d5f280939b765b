"""File contracts (TRIDENT-compatible HDF5 and GeoJSON) and atomic writes.

Every writer goes through ``atomic_path``: the data lands in a temporary file next to the target and is
renamed over it only once complete, so a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import h5py
import numpy as np

from . import __version__

COORDS_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                "name", "savetodir", "level0_width", "level0_height")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the target folder; rename it to ``path`` on success, delete it on error."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _attr_value(v: Any):
    if v is None:
        return "None"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def _write_coords(f: h5py.File, coords: np.ndarray, attrs: dict) -> None:
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    ds = f.create_dataset("coords", data=coords, maxshape=(None, 2))
    for k, v in attrs.items():
        ds.attrs[k] = _attr_value(v)


def save_coords_h5(path: str, coords: np.ndarray, attrs: dict, provenance: dict | None = None) -> str:
    """Coordinates file: dataset ``coords`` (N, 2) int64 with the contract's attributes."""
    missing = [k for k in COORDS_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"coords attributes missing: {missing}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_coords(f, coords, attrs)
        _write_provenance(f, provenance)
    return os.path.abspath(path)


def read_coords_h5(path: str) -> tuple[np.ndarray, dict]:
    """(coords, attrs) of a TRIDENT coords file, a features file (it carries a copy) or a CLAM file."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ValueError(f"{path}: no 'coords' dataset (datasets: {list(f.keys())}); not a coords file.")
            ds = f["coords"]
            attrs = {k: _decode(v) for k, v in ds.attrs.items()}
            return ds[:].astype(np.int64).reshape(-1, 2), attrs
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e}); re-create it from its upstream step.") from e


def save_features_h5(path: str, features: np.ndarray, coords: np.ndarray, coords_attrs: dict, feature_attrs: dict,
                     provenance: dict | None = None) -> str:
    """Patch features (N, D) or slide features (D,), with a copy of the coords so the file stands alone."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("features", data=np.asarray(features))
        for k, v in feature_attrs.items():
            ds.attrs[k] = _attr_value(v)
        _write_coords(f, coords, coords_attrs)
        _write_provenance(f, provenance)
    return os.path.abspath(path)


def read_features_h5(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features, coords, coords attrs)."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset; not a features file.")
            features = f["features"][:]
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e}); re-create it from its upstream step.") from e
    coords, attrs = read_coords_h5(path)
    return features, coords, attrs


def read_provenance(path: str) -> dict:
    with h5py.File(path, "r") as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


def _write_provenance(f: h5py.File, provenance: dict | None) -> None:
    f.attrs["trident_dagster_version"] = __version__
    for k, v in (provenance or {}).items():
        f.attrs[k] = _attr_value(v)


def _decode(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_json(path: str, data: dict) -> str:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    return os.path.abspath(path)


def save_image(path: str, img, **kwargs) -> str:
    """Save a PIL image atomically (the format comes from the target's extension)."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return os.path.abspath(path)
