"""TRIDENT's import path (`trident.patch_encoder_models.load`) for the same factory, so scripts written for TRIDENT run."""
from . import encoder_factory  # noqa: F401
