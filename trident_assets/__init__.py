"""trident_assets: the Dagster code location over trident_lib (slides as dynamic partitions)."""

from .definitions import build_definitions

defs = build_definitions()

__all__ = ["defs", "build_definitions"]
