"""Models kept in memory by a long-lived process (a Celery worker, a notebook), so N slides load an encoder
once, not N times.

The key is what decides the model's weights and where it lives: kind, name, the weights file's checksum (or
"default" for the encoder's own weights source), the device, and the build options. A worker pinned to one
GPU keeps its models on that GPU between steps. At most ``TRIDENT_MODEL_CACHE_SIZE`` models (default 2) are
kept; the least recently used one is dropped first.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .weights import file_checksum

_models: OrderedDict[tuple, object] = OrderedDict()
_lock = threading.Lock()


def cache_size() -> int:
    return max(0, int(os.environ.get("TRIDENT_MODEL_CACHE_SIZE", "2")))


def cache_key(kind: str, name: str, weights_path, device: str, **options) -> tuple:
    # file_checksum is memoised on (path, mtime, size): hashing a large checkpoint happens once per process.
    weights = file_checksum(weights_path) if weights_path and os.path.isfile(weights_path) else \
        (os.fspath(weights_path) if weights_path else "default")
    return (kind, name, weights, str(device), tuple(sorted(options.items())))


def cached_model(kind: str, name: str, weights_path, device: str, build: Callable[[], object],
                 **options) -> tuple[object, str, float]:
    """``(model, "loaded" | "reused", seconds)``. ``build()`` makes the model when it is not cached; the caller
    still moves it to ``device`` (a no-op for a model already there)."""
    key = cache_key(kind, name, weights_path, device, **options)
    t0 = time.perf_counter()
    with _lock:  # one build at a time: two threads asking for the same model must not load it twice
        if key in _models:
            _models.move_to_end(key)
            return _models[key], "reused", time.perf_counter() - t0
        model = build()
        if cache_size():
            _models[key] = model
            while len(_models) > cache_size():
                _models.popitem(last=False)
                _release_gpu_memory()
        return model, "loaded", time.perf_counter() - t0


def clear() -> None:
    with _lock:
        _models.clear()
        _release_gpu_memory()


def _release_gpu_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
