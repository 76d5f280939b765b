"""Slide readers and ``load_wsi``, which picks one by file extension."""

from __future__ import annotations

import os
from typing import Literal

from ..errors import UnsupportedFormatError
from .base import WSI
from .czi_wsi import CZIWSI
from .image_wsi import ImageWSI
from .omezarr_wsi import OMEZarrWSI
from .openslide_wsi import OpenSlideWSI
from .optional import CuCIMWSI, SDPCWSI

WSIReaderType = Literal["openslide", "image", "cucim", "sdpc", "omezarr", "czi"]

READERS: dict[str, type[WSI]] = {
    "openslide": OpenSlideWSI,
    "image": ImageWSI,
    "cucim": CuCIMWSI,
    "sdpc": SDPCWSI,
    "omezarr": OMEZarrWSI,
    "czi": CZIWSI,
}

OPENSLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".dcm",
                        ".svslide")
EXTENSION_READER = {
    **{ext: "openslide" for ext in OPENSLIDE_EXTENSIONS},
    ".png": "image", ".jpg": "image", ".jpeg": "image",
    ".zarr": "omezarr",
    ".czi": "czi",
    ".sdpc": "sdpc",
}
SUPPORTED_EXTENSIONS = tuple(sorted(EXTENSION_READER))


def slide_extension(path: str) -> str:
    """Lower-case extension; a folder of DICOM files counts as '.dcm'."""
    path = os.path.normpath(os.fspath(path))
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) and ext != ".zarr":
        names = os.listdir(path)
        if ".zattrs" in names or "zarr.json" in names:
            return ".zarr"
        if any(n.lower().endswith(".dcm") for n in names):
            return ".dcm"
    return ext


def reader_for(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    ext = slide_extension(path)
    if ext not in EXTENSION_READER:
        raise UnsupportedFormatError(
            path, f"has the extension '{ext or '(none)'}', which no reader supports.",
            f"convert it to a pyramidal TIFF; supported extensions are {', '.join(SUPPORTED_EXTENSIONS)}.",
        )
    reader = EXTENSION_READER[ext]
    if ext in (".tif", ".tiff") and os.path.isfile(path):
        import openslide

        if openslide.OpenSlide.detect_format(path) is None:
            reader = "image"  # a plain (untiled) TIFF that OpenSlide refuses
    return reader


def load_wsi(slide_path: str | os.PathLike, reader_type: WSIReaderType | None = None, lazy_init: bool = False,
             **kwargs) -> WSI:
    """Open a slide with the reader its extension calls for, or the one asked for."""
    slide_path = os.fspath(slide_path)
    if reader_type is None:
        reader_type = reader_for(slide_path)
    if reader_type not in READERS:
        raise ValueError(f"Unknown reader_type {reader_type!r}; choose one of {sorted(READERS)}.")
    return READERS[reader_type](slide_path, lazy_init=lazy_init, **kwargs)


__all__ = ["WSI", "OpenSlideWSI", "ImageWSI", "OMEZarrWSI", "CZIWSI", "CuCIMWSI", "SDPCWSI", "load_wsi",
           "READERS", "SUPPORTED_EXTENSIONS", "slide_extension", "reader_for"]
