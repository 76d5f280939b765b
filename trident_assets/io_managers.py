"""One IO manager for every slide output: GeoJSON, HDF5 and JSON in TRIDENT's job-folder layout.

Files are written atomically (temp file, then rename; on object stores a single PUT), one per
(asset, slide), on local disk or any fsspec location. A TRIDENT user can point existing code at the root:

    <root>/contours_geojson/<slide>.geojson
    <root>/20x_256px_0px_overlap/patches/<slide>_patches.h5
    <root>/20x_256px_0px_overlap/features_<encoder>/<slide>.h5
    <root>/20x_256px_0px_overlap/slide_features_<slide encoder>/<slide>.h5
    <root>/cohort/<table>.parquet
"""

from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass, field

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
from dagster import ConfigurableIOManager, Failure, InputContext, MetadataValue, OutputContext

from trident_lib.contours import load_geojson, save_geojson
from trident_lib.patching import draw_coords
from trident_lib.segmentation import THUMBNAIL_SIZE
from trident_lib.io import (save_image, atomic_path, read_coords_h5, read_features_h5, read_provenance, save_coords_h5,
                            save_features_h5)

from .inbox import SlideFile, redact
from .keys import validate_key

COORDS_DIR_KEY = "trident/coords_dir"


@dataclass
class Tissue:
    gdf: gpd.GeoDataFrame
    provenance: dict = field(default_factory=dict)


@dataclass
class Coords:
    coords: np.ndarray
    attrs: dict
    provenance: dict = field(default_factory=dict)


@dataclass
class Features:
    features: np.ndarray
    coords: np.ndarray
    attrs: dict
    feature_attrs: dict
    provenance: dict = field(default_factory=dict)


def output_relpath(asset_path: list[str], slide: str | None, coords_dir: str | None) -> str:
    head = asset_path[0]
    if slide is None:
        return posixpath.join("cohort", f"{asset_path[-1]}.parquet")
    slide = validate_key(slide)
    if head == "slide_file":
        return posixpath.join("slides", f"{slide}.json")
    if head == "tissue_contours":
        return posixpath.join("contours_geojson", f"{slide}.geojson")
    if head == "patch_coords":
        return posixpath.join(asset_path[1], "patches", f"{slide}_patches.h5")
    if head == "patch_features":
        return posixpath.join(coords_dir, f"features_{asset_path[1]}", f"{slide}.h5")
    if head == "slide_embeddings":
        return posixpath.join(coords_dir, f"slide_features_{asset_path[1]}", f"{slide}.h5")
    raise ValueError(f"no file layout for asset {'/'.join(asset_path)}")


def _write_json(path: str, value: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=2)


def _write_local(path: str, value) -> None:
    if isinstance(value, SlideFile):
        _write_json(path, value.to_dict())
    elif isinstance(value, Tissue):
        save_geojson(value.gdf, path, value.provenance)
    elif isinstance(value, Coords):
        save_coords_h5(path, value.coords, value.attrs, value.provenance)
    elif isinstance(value, Features):
        save_features_h5(path, value.features, value.coords, value.attrs, value.feature_attrs, value.provenance)
    elif isinstance(value, pd.DataFrame):
        with atomic_path(path) as tmp:
            value.to_parquet(tmp, index=False)
    else:
        raise TypeError(f"cannot store {type(value).__name__} at {path}")


def _read_local(path: str, asset_head: str):
    if asset_head == "slide_file":
        with open(path) as f:
            return SlideFile(**json.load(f))
    if asset_head == "tissue_contours":
        with open(path) as f:
            provenance = json.load(f).get("trident_dagster", {})
        return Tissue(load_geojson(path), provenance)
    if asset_head == "patch_coords":
        coords, attrs = read_coords_h5(path)
        return Coords(coords, attrs, read_provenance(path))
    if asset_head in ("patch_features", "slide_embeddings"):
        features, coords, attrs = read_features_h5(path)
        return Features(features, coords, attrs, {}, read_provenance(path))
    return pd.read_parquet(path)


class TridentIOManager(ConfigurableIOManager):
    """Stores each slide's output as one file under ``base_path`` (a folder or an fsspec URL)."""

    base_path: str

    def _fs(self):
        return fsspec.core.url_to_fs(self.base_path)

    def path_for(self, context, slide: str | None) -> str:
        meta = context.definition_metadata or {}
        coords_dir = meta.get(COORDS_DIR_KEY)
        return self.file_for(list(context.asset_key.path), slide, getattr(coords_dir, "value", coords_dir))

    def file_for(self, asset_path: list[str], slide: str | None, coords_dir: str | None) -> str:
        rel = output_relpath(asset_path, slide, coords_dir)
        _, root = self._fs()
        full = posixpath.normpath(posixpath.join(root, rel))
        if not full.startswith(posixpath.normpath(root) + "/"):  # belt and braces: never outside the root
            raise ValueError(f"refusing to write outside {self.base_path}: {rel}")
        return full

    def _write(self, path: str, writer) -> None:
        """``writer(local_path)`` writes atomically; remote targets get one upload of the finished file."""
        fs, _ = self._fs()
        if self._is_local(fs):
            writer(path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, posixpath.basename(path))
            writer(local)
            fs.put_file(local, path)  # one PUT: readers see the whole object or none

    def _read(self, path: str, asset_head: str):
        fs, _ = self._fs()
        if self._is_local(fs):
            return _read_local(path, asset_head)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, posixpath.basename(path))
            fs.get_file(path, local)
            return _read_local(local, asset_head)

    def read_table(self, asset_path: list[str]) -> pd.DataFrame | None:
        """A cohort table as last written, or None."""
        path = self.file_for(asset_path, None, None)
        return self._read(path, asset_path[0]) if self._fs()[0].exists(path) else None

    def read_existing(self, asset_path: list[str], slides: list[str], coords_dir: str | None) -> dict:
        """The outputs that exist and read cleanly (for cohort tables; missing slides are skipped)."""
        fs, _ = self._fs()
        out = {}
        for slide in slides:
            path = self.file_for(asset_path, slide, coords_dir)
            if fs.exists(path):
                try:
                    out[slide] = self._read(path, asset_path[0])
                except (ValueError, OSError, KeyError, json.JSONDecodeError):
                    continue
        return out

    # Slides that have been arriving for too long (the inbox sensor reports them once): one small JSON each,
    # so cohort_qc and `trident-dagster status` list them although they are not partitions yet.
    def recorded_fingerprint(self, slide: str) -> str | None:
        """The fingerprint of the file this slide's ``slide_file`` last recorded; None if never."""
        fs, _ = self._fs()
        try:
            with fs.open(self.file_for(["slide_file"], slide, None)) as f:
                return SlideFile(**json.load(f)).fingerprint
        except FileNotFoundError:
            return None

    def mark_arriving(self, slide: str, message: str) -> None:
        path = posixpath.join(self._fs()[1], "arriving", f"{validate_key(slide)}.json")
        self._write(path, lambda p: _write_json(p, {"slide": slide, "error": message}))

    def clear_arriving(self, slide: str) -> None:
        fs, root = self._fs()
        path = posixpath.join(root, "arriving", f"{validate_key(slide)}.json")
        if fs.exists(path):
            fs.rm(path)

    def arriving(self) -> dict[str, str]:
        fs, root = self._fs()
        out = {}
        for path in fs.glob(posixpath.join(root, "arriving", "*.json")):
            with fs.open(path) as f:
                record = json.load(f)
            out[record["slide"]] = record["error"]
        return out

    def save_pictures(self, wsi, gdf, slide: str) -> dict:
        """TRIDENT's thumbnails/<slide>.jpg and contours/<slide>.jpg; the overlay also inline for the UI."""
        thumb = wsi.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        overlay = draw_coords(wsi, np.zeros((0, 2)), 0, THUMBNAIL_SIZE, contours=gdf)
        paths = {}
        for folder, img in (("thumbnails", thumb), ("contours", overlay)):
            path = posixpath.join(self._fs()[1], folder, f"{validate_key(slide)}.jpg")
            self._write(path, lambda p, img=img: save_image(p, img, quality=90))
            paths[folder] = path
        paths["md"] = picture_md(overlay)
        return paths

    def _is_local(self, fs) -> bool:
        protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
        return protocol in ("file", "local")

    def _slides(self, context) -> list[str | None]:
        return list(context.asset_partition_keys) if context.has_asset_partitions else [None]

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is None:
            return
        slides = self._slides(context)
        values = obj if slides != [None] else {None: obj}
        for slide, value in values.items():
            self._write(self.path_for(context, slide), lambda p, value=value: _write_local(p, value))
        first = self.path_for(context, next(iter(values)))
        context.add_output_metadata({"path": redact(first if len(values) == 1 else posixpath.dirname(first))})

    def load_input(self, context: InputContext):
        upstream = context.upstream_output
        slides = list(context.asset_partition_keys) if context.has_asset_partitions else [None]
        fs, _ = self._fs()
        name = "/".join(context.asset_key.path)
        out = {}
        for slide in slides:
            path = self.path_for(upstream, slide)
            # A missing or unreadable upstream file is not transient: fail without retries, saying what to do.
            if not fs.exists(path):
                raise Failure(f"{slide}: {name} has no output at {redact(path)}; materialize it first.",
                              allow_retries=False)
            try:
                out[slide] = self._read(path, context.asset_key.path[0])
            except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
                raise Failure(f"{slide}: the upstream output {redact(path)} is unreadable ({e}); re-materialize "
                              f"{name} for this slide.", allow_retries=False) from e
        return out if slides != [None] else out[None]


def picture_md(img, max_size: int = 512) -> MetadataValue:
    """A small JPEG inline in markdown, so the UI shows it in the asset's metadata."""
    img = img.copy()
    img.thumbnail((max_size, max_size))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return MetadataValue.md(f"![](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})")


def markdown_table(df: pd.DataFrame, max_rows: int = 50) -> MetadataValue:
    rows = [[str(v) for v in r] for r in df.head(max_rows).itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return MetadataValue.md("\n".join(lines))
