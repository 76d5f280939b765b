"""The slide interface every reader implements (the shape of openslide-python's AbstractSlide)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from ..errors import MissingMPPError, SlideError, SlideReadError
from ..mpp import HOW_TO_SUPPLY_MPP, mag_from_mpp, mpp_from_properties


class WSI(ABC):
    """A whole-slide image. Level 0 is full resolution; coordinates are level-0 pixels.

    Readers open lazily when ``lazy_init=True`` (the seed's default for the classes);
    ``load_wsi`` opens at once unless asked not to.
    """

    reader_type = "base"

    def __init__(
        self,
        slide_path: str,
        name: str | None = None,
        custom_mpp_keys: Sequence[str] | None = None,
        lazy_init: bool = True,
        mpp: float | None = None,
        max_workers: int | None = None,
        tissue_seg_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        self.slide_path = os.fspath(slide_path)
        base = os.path.basename(os.path.normpath(self.slide_path))
        self.name = name if name is not None else os.path.splitext(base)[0]
        self.custom_mpp_keys = list(custom_mpp_keys or [])
        self.max_workers = max_workers
        # A GeoJSON mask from an earlier segmentation (TRIDENT's keyword): patching uses it when no
        # segmentation ran on this object.
        self.tissue_seg_path = os.fspath(tissue_seg_path) if tissue_seg_path is not None else None
        self._mpp_override = float(mpp) if mpp is not None else None
        self.lazy_init = lazy_init
        self._ready = False
        self.mpp: float | None = None
        self.mag: float | None = None
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.properties: dict[str, str] = {}
        if not lazy_init:
            self._lazy_initialize()

    # -- reader hooks -------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None:
        """Open the file; fill level_dimensions, level_downsamples and properties."""

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 RGB of the region; pixels outside the slide are black."""

    def _close(self) -> None:
        pass

    def _native_mpp(self) -> float | None:
        return mpp_from_properties(self.properties, self.custom_mpp_keys)

    # -- lifecycle ----------------------------------------------------------------------
    def _lazy_initialize(self) -> None:
        if self._ready:
            return
        try:
            self._open()
        except (SlideError, ImportError):
            raise
        except Exception as e:  # any backend failure becomes one clear error
            raise SlideReadError(
                self.slide_path, f"cannot be read by the {self.reader_type} reader ({type(e).__name__}: {e})."
            ) from e
        self.mpp = self._mpp_override if self._mpp_override is not None else self._native_mpp()
        if self.mpp is None:
            self._close()
            raise MissingMPPError(self.slide_path, "has no pixel size (mpp) in its metadata.", HOW_TO_SUPPLY_MPP)
        self.mag = mag_from_mpp(self.mpp)
        self._ready = True

    def release(self) -> None:
        """Close file handles and drop cached pixels; the object can be re-opened lazily."""
        if self._ready:
            self._close()
        self._ready = False
        self.gdf_contours = None  # per-slide results must not pile up over a long cohort

    close = release

    def __getstate__(self):
        # Backend handles do not cross process boundaries: a data-loader worker re-opens the file lazily.
        state = {k: v for k, v in self.__dict__.items()
                 if k in ("slide_path", "name", "custom_mpp_keys", "max_workers", "_mpp_override", "tissue_seg_path")}
        state.update(lazy_init=True, _ready=False, mpp=self.mpp, mag=self.mag, level_dimensions=[],
                     level_downsamples=[], properties={})
        return state

    def __enter__(self):
        self._lazy_initialize()
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        if not self._ready:
            return f"<{type(self).__name__} {self.name} (not opened)>"
        w, h = self.dimensions
        return f"<width={w}, height={h}, backend={type(self).__name__}, mpp={self.mpp}, mag={self.mag}>"

    # -- geometry -----------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        self._lazy_initialize()
        return self.level_dimensions[0]

    def get_dimensions(self) -> tuple[int, int]:
        return self.dimensions

    @property
    def width(self) -> int:
        return self.dimensions[0]

    @property
    def height(self) -> int:
        return self.dimensions[1]

    @property
    def level_count(self) -> int:
        self._lazy_initialize()
        return len(self.level_dimensions)

    def get_best_level_and_custom_downsample(self, downsample: float, tolerance: float = 0.01) -> tuple[int, float]:
        """The level to read for a wanted downsample, and the resize still needed after reading it.

        A level whose downsample is within ``tolerance`` of the wanted one is used as is;
        otherwise the last level below the wanted downsample, resized by the remaining factor.
        """
        self._lazy_initialize()
        for level, ds in enumerate(self.level_downsamples):
            if abs(ds - downsample) <= tolerance:
                return level, 1.0
        below = [lvl for lvl, ds in enumerate(self.level_downsamples) if ds < downsample]
        level = below[-1] if below else 0
        return level, downsample / self.level_downsamples[level]

    # -- pixels -------------------------------------------------------------------------
    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        read_as: Literal["pil", "numpy"] = "pil",
    ) -> Image.Image | np.ndarray:
        if read_as not in ("pil", "numpy"):
            raise ValueError(f"read_as must be 'pil' or 'numpy', got {read_as!r}")
        self._lazy_initialize()
        if not 0 <= level < len(self.level_dimensions):
            raise ValueError(f"{self.name}: level {level} does not exist (the slide has {self.level_count}).")
        arr = self._read((int(location[0]), int(location[1])), level, (int(size[0]), int(size[1])))
        return Image.fromarray(arr) if read_as == "pil" else arr

    def can_read_reduced(self, level: int) -> bool:
        """Whether ``read_region_reduced`` works at this level (the fast read path; JPEG-tiled TIFF levels)."""
        return False

    def read_region_reduced(self, location: tuple[int, int], level: int, size: tuple[int, int],
                            scale: int) -> np.ndarray | None:
        """The region decoded at 1/``scale`` of ``size`` (scale 1, 2, 4 or 8), approximately, where the reader can
        do so cheaply (JPEG tiles: libjpeg's DCT scaling); None where it cannot (read at full size instead)."""
        return None

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """RGB thumbnail that fits in ``size``, read from the smallest level that is large enough."""
        self._lazy_initialize()
        w, h = self.dimensions
        scale = min(size[0] / w, size[1] / h)
        want_ds = 1.0 / scale if scale > 0 else 1.0
        level = 0
        for lvl, ds in enumerate(self.level_downsamples):
            if ds <= want_ds:
                level = lvl
        lw, lh = self.level_dimensions[level]
        img = Image.fromarray(self._read((0, 0), level, (lw, lh)))
        img.thumbnail((max(1, int(size[0])), max(1, int(size[1]))), Image.Resampling.LANCZOS)
        return img

    # -- the seed's per-slide operations (implemented in their own modules) -------------
    def create_patcher(self, patch_size: int, src_pixel_size=None, dst_pixel_size=None, src_mag=None,
                       dst_mag=None, overlap: int = 0, mask=None, coords_only: bool = False,
                       custom_coords=None, threshold: float = 0.15, pil: bool = False, **kwargs):
        from ..patching import WSIPatcher

        return WSIPatcher(self, patch_size, src_pixel_size=src_pixel_size, dst_pixel_size=dst_pixel_size,
                          src_mag=src_mag, dst_mag=dst_mag, overlap=overlap, mask=mask,
                          coords_only=coords_only, custom_coords=custom_coords, threshold=threshold,
                          pil=pil, **kwargs)

    def segment_tissue(self, segmentation_model, target_mag: int = 10, holes_are_tissue: bool = True,
                       job_dir: str | None = None, batch_size: int = 16, device: str = "cuda:0",
                       verbose=False, num_workers=None, **kwargs):
        from ..segmentation import segment_tissue

        return segment_tissue(self, segmentation_model, target_mag=target_mag,
                              holes_are_tissue=holes_are_tissue, job_dir=job_dir, batch_size=batch_size,
                              device=device, verbose=verbose, num_workers=num_workers, **kwargs)

    def segment_semantic(self, segmentation_model, target_mag: int = 10, batch_size: int = 16,
                         device: str = "cuda:0", verbose=False, num_workers=None, collate_fn=None, inference_fn=None,
                         return_contours=False):
        from ..segmentation import segment_semantic

        return segment_semantic(self, segmentation_model, target_mag, batch_size, device, verbose, num_workers,
                                collate_fn, inference_fn, return_contours)

    def extract_tissue_coords(self, target_mag: int, patch_size: int, save_coords: str, overlap: int = 0,
                              min_tissue_proportion: float = 0.0, **kwargs) -> str:
        from ..patching import extract_tissue_coords

        return extract_tissue_coords(self, target_mag, patch_size, save_coords, overlap=overlap,
                                     min_tissue_proportion=min_tissue_proportion, **kwargs)

    def visualize_coords(self, coords_path: str, save_patch_viz: str) -> str:
        from ..patching import visualize_coords

        return visualize_coords(self, coords_path, save_patch_viz)

    def dump_patches(self, coords_path: str, save_patches_dir: str, max_patches: int = 0,
                     image_format: str = "png", jpeg_quality: int = 90) -> str:
        from ..patching import dump_patches

        return dump_patches(self, coords_path, save_patches_dir, max_patches, image_format, jpeg_quality)

    def extract_patch_features(self, patch_encoder, coords_path: str, save_features: str,
                               device: str = "cuda:0", saveas: str = "h5", batch_limit: int = 512,
                               verbose: bool = False, **kwargs) -> str:
        from ..extraction import extract_patch_features

        return extract_patch_features(self, patch_encoder, coords_path, save_features, device=device,
                                      saveas=saveas, batch_limit=batch_limit, verbose=verbose, **kwargs)

    def extract_features(self, patch_encoder, coords_path: str, save_features: str, device: str = "cuda:0",
                         saveas: str = "h5", batch_limit: int = 512, verbose: bool = False, **kwargs) -> str:
        """The name the seed's own examples use for ``extract_patch_features`` (same arguments)."""
        return self.extract_patch_features(patch_encoder, coords_path, save_features, device=device, saveas=saveas,
                                           batch_limit=batch_limit, verbose=verbose, **kwargs)

    def extract_slide_features(self, patch_features_path: str, slide_encoder, save_features: str,
                               device: str = "cuda") -> str:
        from ..extraction import extract_slide_features

        return extract_slide_features(patch_features_path, slide_encoder, save_features, device=device,
                                      name=self.name)
