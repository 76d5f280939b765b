"""trident_lib: a TRIDENT-compatible slide-processing library (readers, segmentation, patching, encoders).

It never imports dagster; use it from notebooks and scripts as TRIDENT's API is used.
"""

__version__ = "0.1.0"

from .errors import (MissingDependencyError, MissingMPPError, SlideError, SlideReadError,  # noqa: E402
                     SlideTooLargeError, UnsupportedFormatError, WeightsNotFoundError)
from .readers import (CZIWSI, OMEZarrWSI, CuCIMWSI, ImageWSI, OpenSlideWSI, SDPCWSI, WSI,  # noqa: E402
                      load_wsi)
from .patching import WSIPatcher  # noqa: E402
from .data import WSIPatcherDataset  # noqa: E402

OpenSlideWSIPatcher = WSIPatcher  # the seed's alias


def deprecated(func):
    """Mark a function as deprecated: calling it warns once per call site."""
    import functools
    import warnings

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.warn(f"{func.__name__} is deprecated.", DeprecationWarning, stacklevel=2)
        return func(*args, **kwargs)

    return wrapper


def __getattr__(name):
    # Heavier parts load on first use, so `import trident_lib` stays quick.
    if name == "Processor":
        from .processor import Processor

        return Processor
    if name == "AnyToTiffConverter":
        from .converter import AnyToTiffConverter

        return AnyToTiffConverter
    if name == "visualize_heatmap":
        from .heatmap import visualize_heatmap

        return visualize_heatmap
    raise AttributeError(f"module 'trident_lib' has no attribute {name!r}")


__all__ = ["__version__", "load_wsi", "WSI", "OpenSlideWSI", "ImageWSI", "OMEZarrWSI", "CZIWSI", "CuCIMWSI",
           "SDPCWSI", "WSIPatcher", "OpenSlideWSIPatcher", "WSIPatcherDataset", "Processor", "AnyToTiffConverter",
           "visualize_heatmap", "deprecated", "SlideError", "SlideReadError", "UnsupportedFormatError",
           "MissingMPPError", "SlideTooLargeError", "MissingDependencyError", "WeightsNotFoundError"]
