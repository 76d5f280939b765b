"""Slide ids: sanitised, unique, stable partition keys that can never address a path outside the root."""

from __future__ import annotations

import hashlib
import re
import unicodedata

KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_KEY_LENGTH = 120


def slide_key(relative_path: str) -> str:
    """Key for a slide from its path relative to the inbox: the file name with its extension, sub-folders
    joined by '__' (``sub/a.svs`` -> ``sub__a.svs``), so ``a.svs`` and ``a.tif`` stay apart.

    Names that are already valid are kept as they are; a name that had to be changed (spaces, commas,
    non-ASCII letters...) gets a short hash of its original path, so two names that sanitise alike still
    get distinct keys, and the same file always gets the same key.
    """
    rel = relative_path.replace("\\", "/").strip("/")
    plain = rel.replace("/", "__")
    ascii_name = unicodedata.normalize("NFKD", plain).encode("ascii", "ignore").decode()
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._-") or "slide"
    if key != plain or len(key) > MAX_KEY_LENGTH:
        stem, dot, ext = key.rpartition(".")
        stem, ext = (stem, dot + ext) if dot and stem and len(ext) <= 8 else (key, "")
        key = f"{stem[:MAX_KEY_LENGTH - 9 - len(ext)]}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}{ext}"
    return key


def validate_key(key: str) -> str:
    """Refuse keys that are not plain ids (``../x``, ``/abs``, ``a/b``, ``..``, commas, pipes...)."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or key.startswith(".") or \
            len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid slide key {key!r}: keys must match [A-Za-z0-9._-]+, not start with '.', "
                         f"and be at most {MAX_KEY_LENGTH} characters.")
    return key
