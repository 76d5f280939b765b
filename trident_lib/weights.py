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


def load_state_dict(path: str | os.PathLike, model_name: str = "model") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, without unpickling arbitrary objects. Unwraps common containers
    ('state_dict', 'model', 'teacher') and DataParallel 'module.' prefixes."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{model_name}: cannot load weights from {path}: the file is corrupt or not a "
                         f"tensor checkpoint ({type(e).__name__}: {str(e)[:200]}).") from e
    for key in ("state_dict", "model", "teacher", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{model_name}: {path} does not hold a state dict.")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


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
