"""Finding and loading model weights offline.

Order: an explicit ``weights_path`` (a file, or a Hugging Face-style folder); the lab's local registry
(a JSON file named by ``TRIDENT_WEIGHTS_REGISTRY``, mapping model names to paths); the local
Hugging Face hub cache. Nothing is ever downloaded. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from typing import Iterable

import torch

from .errors import WeightsNotFoundError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
REGISTRY_ENV = "TRIDENT_WEIGHTS_REGISTRY"


def hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def registry_entries() -> dict[str, str]:
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{REGISTRY_ENV}={path}: not a readable JSON registry of weights ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{REGISTRY_ENV}={path}: must map model names to checkpoint paths.")
    return {str(k): str(v) for k, v in data.items()}


def _file_in(folder: str, filenames: Iterable[str]) -> str | None:
    for name in filenames:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _hub_snapshot_file(repo_id: str, filenames: Iterable[str]) -> tuple[str | None, str]:
    repo_dir = os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    if os.path.isdir(snapshots):
        ref = os.path.join(repo_dir, "refs", "main")
        revisions = sorted(os.listdir(snapshots))
        if os.path.isfile(ref):  # prefer the revision the cache calls main
            with open(ref) as f:
                main = f.read().strip()
            revisions.sort(key=lambda r: r != main)
        for rev in revisions:
            found = _file_in(os.path.join(snapshots, rev), filenames)
            if found:
                return found, repo_dir
    return None, repo_dir


def find_weights(model_name: str, weights_path: str | os.PathLike | None = None, hub_repo: str | None = None,
                 filenames: Iterable[str] = ("model.safetensors", "pytorch_model.bin")) -> str:
    """Path (a str) of the checkpoint file for ``model_name``, or a clear error listing where we looked.
    ``weights_path`` may be a str or any os.PathLike (pathlib.Path)."""
    filenames = tuple(filenames)
    weights_path = os.fspath(weights_path) if weights_path is not None else None
    looked = []
    if weights_path:
        if os.path.isfile(weights_path):
            return weights_path
        if os.path.isdir(weights_path):
            found = _file_in(weights_path, filenames)
            if found:
                return found
            looked.append(f"{weights_path} (folder without {' / '.join(filenames)})")
        else:
            looked.append(f"{weights_path} (does not exist)")
        raise WeightsNotFoundError(model_name, looked, "Check the path given as weights_path.")
    registry = registry_entries()
    if model_name in registry:
        return find_weights(model_name, registry[model_name], None, filenames)
    looked.append(f"${REGISTRY_ENV} " + (f"({os.environ[REGISTRY_ENV]}: no entry)" if os.environ.get(REGISTRY_ENV)
                                          else "(not set)"))
    if hub_repo:
        found, repo_dir = _hub_snapshot_file(hub_repo, filenames)
        if found:
            return found
        looked.append(f"hub cache {repo_dir}")
    how = (f"Pass weights_path=<checkpoint file or folder>, list '{model_name}' in a JSON file named by "
           f"${REGISTRY_ENV}, or copy the files into the hub cache"
           + (f" for {hub_repo}" if hub_repo else "") + " on a machine that has them. No download is attempted.")
    raise WeightsNotFoundError(model_name, looked, how)


UNPICKLE_HELP = ("Convert it once to safetensors, on a machine where you trust the file's source: "
                 "`trident-dagster convert-weights {path} <out>.safetensors --trust`, then pass the .safetensors file.")


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that needs objects beyond tensors and plain data: never unpickled silently."""


def _data_only_globals() -> list:
    """Objects training scripts store next to the weights (an epoch as a numpy scalar, argparse options) that
    only hold data: allowed under ``weights_only=True``. numpy 1.x files name the scalar ``numpy.core``."""
    import argparse

    allowed: list = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += sorted({type(np.dtype(c)) for c in "?bhilqBHILQefdFD"}, key=str)
    return allowed


def torch_load(path: str | os.PathLike, model_name: str = "model"):
    """``torch.load`` with ``weights_only=True`` and the data-only allow-list; a file that needs more
    (pickled classes or functions) is refused with what it needs and how to convert it."""
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_data_only_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        try:
            needs = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown objects"
        except Exception:  # noqa: BLE001  (an old-format file: the list is only a hint)
            needs = "objects other than tensors"
        raise UnsafeCheckpointError(
            f"{model_name}: {path} is a pickle that needs {needs}; loading it would run code from the file, "
            f"so it is refused. " + UNPICKLE_HELP.format(path=path)) from None


def unwrap_state_dict(sd, model_name: str = "model", path: str = "") -> dict:
    """The tensors of a loaded checkpoint: unwraps common containers ('state_dict' of Lightning, 'model' of
    timm/DINO-style training scripts, 'teacher', 'model_state_dict') and DataParallel 'module.' prefixes."""
    for key in ("state_dict", "model", "teacher", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{model_name}: {path} does not hold a state dict.")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict(path: str | os.PathLike, model_name: str = "model") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, without unpickling arbitrary objects (see ``torch_load``)."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch_load(path, model_name)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise ValueError(f"{model_name}: cannot load weights from {path}: the file is corrupt or not a "
                         f"tensor checkpoint ({type(e).__name__}: {str(e)[:200]}).") from e
    return unwrap_state_dict(sd, model_name, path)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, trust: bool = False) -> int:
    """Write the tensors of checkpoint ``src`` to ``dst`` (.safetensors); returns how many. A pickle that
    needs more than data is unpickled in full only with ``trust=True`` (the caller vouches for the file)."""
    from safetensors.torch import save_file

    src, dst = os.fspath(src), os.fspath(dst)
    try:
        sd = load_state_dict(src, os.path.basename(src))
    except UnsafeCheckpointError:
        if not trust:
            raise
        try:
            full = torch.load(src, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e:  # e.g. a Lightning checkpoint pickled with Lightning's own classes
            raise ValueError(f"{src} names classes from the package '{e.name}': install it to convert the file "
                             f"(pip install {e.name}).") from e
        sd = unwrap_state_dict(full, src, src)
    tensors = {k: v.detach().clone().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{src} holds no tensors.")
    save_file(tensors, dst)
    return len(tensors)


def load_into(model: torch.nn.Module, state_dict: dict, model_name: str, path: str | os.PathLike,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load strictly except for listed prefixes (e.g. a classifier head); a different architecture is a
    clear error naming the model and the file."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state_dict
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{model_name}: the weights in {path} do not fit this architecture ({str(e)[:300]}).") from e
    missing = [k for k in result.missing_keys if not k.startswith(ignore_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{model_name}: the weights in {path} do not fit this architecture "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(result.unexpected_keys)} unexpected, "
            f"e.g. {result.unexpected_keys[:3]})."
        )


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime: float, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksum(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_mtime, st.st_size)
