"""TRIDENT's import path (`trident.slide_encoder_models.load`) for the same factory, so scripts written for TRIDENT run."""
from . import encoder_factory, slide_to_patch_encoder_name  # noqa: F401
