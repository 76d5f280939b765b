"""The lab's configuration: one YAML file (``trident.yaml``, or the path in ``$TRIDENT_CONFIG``).

Which patch and slide encoders run, at which magnification / patch size / overlap, where slides arrive
and where outputs go. Each encoder becomes its own asset; the patch settings decide which
coordinates asset it reads. Values are plain data: nothing in the file is ever evaluated as code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trident_lib.mpp import format_mag
from trident_lib.patch_encoder_models import DEFAULT_ENCODER, encoder_spec
from trident_lib.slide_encoder_models import slide_encoder_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ENV = "TRIDENT_CONFIG"


@dataclass(frozen=True)
class PatchEncoderConfig:
    name: str
    mag: float = 20
    patch_size: int = 256
    overlap: int = 0
    weights_path: str | None = None
    batch_size: int = 64

    @property
    def coords_dir(self) -> str:
        """TRIDENT's folder name for these patch settings, e.g. '20x_256px_0px_overlap'."""
        return f"{format_mag(self.mag)}x_{self.patch_size}px_{self.overlap}px_overlap"


@dataclass(frozen=True)
class SlideEncoderConfig:
    name: str
    weights_path: str | None = None


@dataclass(frozen=True)
class Settings:
    inbox: str = "data/inbox"
    storage: str = "data/outputs"
    segmenter: str = "otsu"
    segmenter_weights_path: str | None = None
    seg_conf_thresh: float = 0.5
    holes_are_tissue: bool = False
    min_tissue_proportion: float = 0.0
    use_measured_mpp: bool = False
    device: str = "auto"  # "auto" picks a free GPU when there is one, else the CPU
    sensor_max_new_slides: int = 50
    backfill_slides_per_run: int = 16
    patch_encoders: tuple[PatchEncoderConfig, ...] = (PatchEncoderConfig(DEFAULT_ENCODER),)
    slide_encoders: tuple[SlideEncoderConfig, ...] = (SlideEncoderConfig(f"mean-{DEFAULT_ENCODER}"),)
    extensions: tuple[str, ...] = field(default=())

    def resolve(self, path: str) -> str:
        """Relative paths are relative to the project root; URLs are left alone."""
        if "://" in path or os.path.isabs(path):
            return path
        return str(PROJECT_ROOT / path)

    @property
    def coords_configs(self) -> dict[str, PatchEncoderConfig]:
        """One coordinates asset per distinct (mag, patch size, overlap)."""
        return {pe.coords_dir: pe for pe in self.patch_encoders}

    def patch_encoder_for(self, slide_encoder: str) -> PatchEncoderConfig:
        needed = slide_encoder_spec(slide_encoder).patch_encoder
        for pe in self.patch_encoders:
            if pe.name == needed:
                return pe
        raise ValueError(f"slide encoder {slide_encoder!r} needs patch features from {needed!r}; add "
                         f"'{needed}' to patch_encoders in the configuration.")


def _validate(s: Settings) -> Settings:
    for pe in s.patch_encoders:
        encoder_spec(pe.name)
        if not 0 <= pe.overlap < pe.patch_size:
            raise ValueError(f"patch encoder {pe.name}: overlap must be >= 0 and < patch_size")
    for se in s.slide_encoders:
        s.patch_encoder_for(se.name)
    return s


def load_settings(path: str | None = None) -> Settings:
    path = path or os.environ.get(CONFIG_ENV) or str(PROJECT_ROOT / "trident.yaml")
    if not os.path.exists(path):
        return _validate(Settings())
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the configuration must be a mapping of settings.")
    known = set(Settings.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}.")
    raw["patch_encoders"] = tuple(PatchEncoderConfig(**(e if isinstance(e, dict) else {"name": e}))
                                  for e in raw.get("patch_encoders") or [{"name": DEFAULT_ENCODER}])
    raw["slide_encoders"] = tuple(SlideEncoderConfig(**(e if isinstance(e, dict) else {"name": e}))
                                  for e in raw.get("slide_encoders") or [])
    raw["extensions"] = tuple(raw.get("extensions") or ())
    return _validate(Settings(**raw))


def version_of(*parts) -> str:
    """A short, stable code_version from parameters (changing any of them marks the asset stale)."""
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def weights_fingerprint(path: str | None) -> str:
    """Cheap identity of a weights file for code versions (the full sha256 goes in run metadata)."""
    if not path or not os.path.exists(path):
        return "none"
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"
