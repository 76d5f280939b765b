"""The lab's configuration: one YAML file (``trident.yaml``, or the path in ``$TRIDENT_CONFIG``).

Which patch and slide encoders run, at which magnification / patch size / overlap, where slides arrive
and where outputs go. Each encoder becomes its own asset; the patch settings decide which
coordinates asset it reads. Values are plain data: nothing in the file is ever evaluated as code.

The lab's project folder holds ``trident.yaml`` and ``dagster_home/``: the current folder, or the one in
``$TRIDENT_PROJECT`` (``trident-dagster --project DIR``). Relative paths in the file are relative to the
folder the file is in, never to where the package is installed.
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

CONFIG_ENV = "TRIDENT_CONFIG"
PROJECT_ENV = "TRIDENT_PROJECT"
TEMPLATES = Path(__file__).resolve().parent / "templates"  # the commented trident.yaml and dagster.yaml
EXECUTORS = ("in_process", "celery", "k8s")


def project_dir() -> Path:
    return Path(os.environ.get(PROJECT_ENV) or os.getcwd()).resolve()


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or project_dir() / "trident.yaml").resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or project_dir() / "dagster_home").resolve()


@dataclass(frozen=True)
class PatchEncoderConfig:
    name: str
    mag: float = 20
    patch_size: int = 256
    overlap: int = 0
    weights_path: str | None = None
    batch_size: int = 64
    fast_cpu: bool = False  # on CPU: BatchNorm folded, bf16, channels-last (features within cosine 0.999)
    fast_read: bool = False  # JPEG tiles decoded at the size needed, no bicubic resize (pixels not TRIDENT's)

    @property
    def coords_dir(self) -> str:
        """TRIDENT's folder name for these patch settings, e.g. '20x_256px_0px_overlap'."""
        return f"{format_mag(self.mag)}x_{self.patch_size}px_{self.overlap}px_overlap"


@dataclass(frozen=True)
class SlideEncoderConfig:
    name: str
    weights_path: str | None = None
    trust_remote_code: bool = False  # TITAN, PRISM: run the model code shipped with the local checkpoint


@dataclass(frozen=True)
class Settings:
    inbox: str = "data/inbox"
    storage: str = "data/outputs"
    segmenter: str = "otsu"
    segmenter_weights_path: str | None = None
    seg_conf_thresh: float = 0.5
    seg_batch_size: int = 16
    holes_are_tissue: bool = True  # TRIDENT's batch default (--remove_holes off)
    min_tissue_proportion: float = 0.0
    use_measured_mpp: bool = False
    max_upsampling: float = 2.0  # patching above this times the scan's magnification is refused
    device: str = "auto"  # "auto" picks a free GPU when there is one, else the CPU
    inbox_sensor: bool = True  # false: the inbox sensor starts stopped (slides are then added by hand or CLI)
    inbox_settle_seconds: float = 30.0  # a slide is processed once its files stopped changing for this long
    slides_per_run: int = 16  # slides that arrive together (sensor) or are backfilled run this many per run
    backfill_above_slides: int = 256  # a drop of more slides than this is requested as one backfill
    slide_cache_dir: str = "data/slide-cache"  # local copies of remote (fsspec) slides for OpenSlide
    slide_cache_max_gb: float = 50.0  # least recently used copies are evicted past this
    # in_process: a run's steps in the run's own process (the embedded setting); celery: steps on Celery workers,
    # GPU steps on the "gpu" queue (broker URL in $TRIDENT_CELERY_BROKER); k8s: each step a Kubernetes job.
    executor: str = "in_process"
    celery_visibility_timeout: float = 7200.0  # celery: a dead worker's step goes to another after this long
    patch_encoders: tuple[PatchEncoderConfig, ...] = (PatchEncoderConfig(DEFAULT_ENCODER),)
    slide_encoders: tuple[SlideEncoderConfig, ...] = (SlideEncoderConfig(f"mean-{DEFAULT_ENCODER}"),)
    extensions: tuple[str, ...] = field(default=())
    root: str = ""  # the folder relative paths start from (the config file's); not a key of the file

    def resolve(self, path: str) -> str:
        """Relative paths are relative to the config file's folder; URLs are left alone."""
        if "://" in path or os.path.isabs(path):
            return path
        return str(Path(self.root or project_dir()) / path)

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
    if s.executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, not {s.executor!r}.")
    for pe in s.patch_encoders:
        encoder_spec(pe.name)
        if not 0 <= pe.overlap < pe.patch_size:
            raise ValueError(f"patch encoder {pe.name}: overlap must be >= 0 and < patch_size")
    for se in s.slide_encoders:
        s.patch_encoder_for(se.name)
    return s


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    path = Path(path).resolve() if path else config_path()
    if not path.exists():
        return _validate(Settings(root=str(path.parent)))
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the configuration must be a mapping of settings.")
    known = set(Settings.__dataclass_fields__) - {"root"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}.")
    # A key left out keeps its default: the default encoder, and the mean of the first patch encoder's
    # features as the slide embedding; `slide_encoders: []` means none.
    raw["patch_encoders"] = tuple(PatchEncoderConfig(**(e if isinstance(e, dict) else {"name": e}))
                                  for e in raw.get("patch_encoders") or [{"name": DEFAULT_ENCODER}])
    raw["slide_encoders"] = tuple(SlideEncoderConfig(**(e if isinstance(e, dict) else {"name": e}))
                                  for e in raw["slide_encoders"] or []) if "slide_encoders" in raw else \
        (SlideEncoderConfig(f"mean-{raw['patch_encoders'][0].name}"),)
    raw["extensions"] = tuple(raw.get("extensions") or ())
    return _validate(Settings(**raw, root=str(path.parent)))


def _write_template(name: str, target: Path) -> list[str]:
    if target.exists():
        return []
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text((TEMPLATES / name).read_text())
    return [str(target)]


def ensure_dagster_home() -> Path:
    """The instance folder, with the default dagster.yaml (SQLite in that folder) if it has none."""
    home = dagster_home()
    _write_template("dagster.yaml", home / "dagster.yaml")
    return home


def init_project(folder: str | os.PathLike) -> list[str]:
    """Write a commented ``trident.yaml`` and ``dagster_home/dagster.yaml`` into ``folder``; files that exist
    are kept. Returns the paths written."""
    folder = Path(folder)
    return _write_template("trident.yaml", folder / "trident.yaml") + \
        _write_template("dagster.yaml", folder / "dagster_home" / "dagster.yaml")


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
