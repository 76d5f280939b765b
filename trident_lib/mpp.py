"""Pixel size (mpp, micrometres per pixel) and nominal magnification, as TRIDENT derives them."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

from .errors import TooLowResolutionError

# Property keys tried in this order; the first that parses as a float wins.
MPP_KEYS = (
    "openslide.mpp-x",
    "openslide.mirax.MPP",
    "aperio.MPP",
    "hamamatsu.XResolution",
    "openslide.comment",
)

# (upper mpp bound, magnification): the nominal objective buckets.
MAG_BUCKETS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))

HOW_TO_SUPPLY_MPP = (
    "pass mpp=<micrometres per pixel> to load_wsi, add an 'mpp' column for this slide in the slide list "
    "(custom_list_of_wsis CSV), or name the metadata key that holds it with custom_mpp_keys."
)


def _as_float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and f == f and f != float("inf") else None


def mpp_from_properties(props: Mapping[str, str], custom_mpp_keys: Sequence[str] | None = None) -> float | None:
    """The slide's level-0 mpp from its metadata, or None when it carries none."""
    for key in (*MPP_KEYS, *(custom_mpp_keys or ())):
        value = _as_float(props.get(key))
        if value is not None:
            return round(value, 4)
    x_res = _as_float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if x_res is not None:
        if unit == "centimeter":
            return round(10000.0 / x_res, 4)
        if unit == "inch":
            return round(25400.0 / x_res, 4)
    return None


def mag_from_mpp(mpp: float) -> float:
    """Nominal magnification bucket; below 5x (mpp >= 2.4) the unbucketed 10 / mpp."""
    for bound, mag in MAG_BUCKETS:
        if mpp < bound:
            return mag
    return round(10.0 / mpp, 4)


def mpp_from_mag(mag: float) -> float:
    return 10.0 / mag


def format_mag(mag: float) -> str:
    """20 -> '20', 1.25 -> '1.25' (TRIDENT folder naming)."""
    return f"{mag:g}"


MAX_UPSAMPLING = 2.0  # patching at more than this times the scan's magnification is refused by default


def check_upsampling(slide_name: str, level0_mag: float, target_mag: float,
                     max_upsampling: float = MAX_UPSAMPLING) -> None:
    """Refuse to patch far above the scan's magnification (each patch would be a few scanned pixels blown
    up); warn when patching above it at all."""
    if target_mag > level0_mag * max_upsampling:
        raise TooLowResolutionError(
            slide_name, f"scanned at {format_mag(level0_mag)}x, too low for patches at {format_mag(target_mag)}x "
            f"({target_mag / level0_mag:.1f}x upsampling; at most {max_upsampling:g}x is allowed).",
            f"patch it at {format_mag(level0_mag)}x or lower, or raise max_upsampling if you really want "
            f"upsampled patches.")
    if target_mag > level0_mag:
        warnings.warn(
            f"{slide_name}: patching at {format_mag(target_mag)}x but the slide is scanned at "
            f"{format_mag(level0_mag)}x; patches will be upsampled and carry no extra detail.",
            stacklevel=3,
        )
