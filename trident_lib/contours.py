"""Tissue contours: binary mask -> polygons, and the GeoJSON contract (QuPath-compatible, level-0 pixels)."""

from __future__ import annotations

import json

import cv2
import geopandas as gpd
import numpy as np
import shapely
from shapely.geometry import Polygon, mapping, shape
from shapely.validation import make_valid

from .io import atomic_path

# Filtering happens on the mask resized to this height (TRIDENT's convention).
CONTOUR_MASK_HEIGHT = 2000
MIN_TISSUE_AREA = 1000
MIN_HOLE_AREA = 4000
MAX_HOLES = 20


def mask_to_gdf(mask: np.ndarray, scale: float, holes_are_tissue: bool = False,
                min_tissue_area: int = MIN_TISSUE_AREA, min_hole_area: int = MIN_HOLE_AREA,
                max_holes: int = MAX_HOLES) -> gpd.GeoDataFrame:
    """Polygons of a binary tissue mask, in level-0 pixels.

    ``scale`` is level-0 pixels per mask pixel. The mask is first resized to 2000 px high, where
    regions under ``min_tissue_area`` px and holes under ``min_hole_area`` px are dropped.
    """
    mask = (np.asarray(mask) > 0).astype(np.uint8) * 255
    h, w = mask.shape
    if h == 0 or w == 0 or not mask.any():
        return empty_gdf()
    factor = CONTOUR_MASK_HEIGHT / h
    # Bilinear on 0/255, and every non-zero pixel counts: regions grow by half a mask pixel, as TRIDENT's do.
    resized = cv2.resize(mask, (max(1, round(w * factor)), CONTOUR_MASK_HEIGHT), interpolation=cv2.INTER_LINEAR)
    to_level0 = scale / factor  # TRIDENT's vertices are floor(vertex * (scale / factor)), in this order
    mode = cv2.RETR_EXTERNAL if holes_are_tissue else cv2.RETR_CCOMP
    contours, hierarchy = cv2.findContours(resized, mode, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return empty_gdf()
    hierarchy = hierarchy[0]
    polygons = []
    for i, (_, _, first_child, parent) in enumerate(hierarchy):
        if parent != -1 or cv2.contourArea(contours[i]) < min_tissue_area or len(contours[i]) < 3:
            continue
        holes = []
        child = first_child
        while child != -1 and not holes_are_tissue:
            if cv2.contourArea(contours[child]) >= min_hole_area and len(contours[child]) >= 3:
                holes.append(contours[child])
            child = hierarchy[child][0]
        holes = sorted(holes, key=cv2.contourArea, reverse=True)[:max_holes]
        shell = np.floor(contours[i][:, 0, :] * to_level0)
        poly = Polygon(shell, [np.floor(hole[:, 0, :] * to_level0) for hole in holes])
        poly = poly if poly.is_valid else make_valid(poly)
        polygons.extend(_polygons_of(poly))
    return gdf_from_polygons(polygons)


def _polygons_of(geom) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for part in getattr(geom, "geoms", []) for g in _polygons_of(part)]


def empty_gdf() -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({"tissue_id": []}, geometry=gpd.GeoSeries([]))


def gdf_from_polygons(polygons: list[Polygon]) -> gpd.GeoDataFrame:
    if not polygons:
        return empty_gdf()
    return gpd.GeoDataFrame({"tissue_id": list(range(len(polygons)))}, geometry=list(polygons))


def save_geojson(gdf: gpd.GeoDataFrame, path: str, provenance: dict | None = None) -> str:
    """FeatureCollection, one Polygon per tissue region with property ``tissue_id``."""
    features = [
        {"type": "Feature", "properties": {"tissue_id": int(i), "objectType": "annotation"},
         "geometry": mapping(geom)}
        for i, geom in enumerate(gdf.geometry)
    ]
    doc = {"type": "FeatureCollection", "features": features}
    if provenance:
        doc["trident_dagster"] = provenance
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f)
    return path


def load_geojson(path: str) -> gpd.GeoDataFrame:
    """Read a tissue GeoJSON, also one edited by hand (QuPath): invalid polygons are repaired, other
    geometry types are ignored, and a file that is not GeoJSON is a clear error."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable GeoJSON file ({e}).") from e
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        doc = {"type": "FeatureCollection", "features": [doc]}
    if not isinstance(doc, dict) or not isinstance(doc.get("features"), list):
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection (no 'features' list).")
    polygons = []
    for k, feat in enumerate(doc["features"]):
        try:
            geom = shape(feat["geometry"])
        except Exception as e:
            raise ValueError(f"{path}: feature {k} has a malformed geometry ({e}).") from e
        if not geom.is_valid:  # e.g. a self-intersecting outline drawn by hand
            geom = make_valid(geom)
        polygons.extend(_polygons_of(geom))
    return gdf_from_polygons([p for p in polygons if p.area > 0])


def tissue_union(gdf: gpd.GeoDataFrame, tolerance: float = 0.0):
    """One (multi)polygon of all tissue, simplified with ``tolerance`` (topology preserved)."""
    geoms = np.asarray(gdf.geometry.values, dtype=object) if len(gdf) else np.array([], dtype=object)
    if tolerance > 0 and len(geoms):
        geoms = shapely.simplify(geoms, tolerance, preserve_topology=True)
    return shapely.union_all(geoms) if len(geoms) else Polygon()
