"""TRIDENT's import path (`trident.segmentation_models.load`) for the same factory, so scripts written for TRIDENT run."""
from . import segmentation_model_factory  # noqa: F401
