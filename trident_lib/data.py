"""Reading tiles in worker processes while the model runs."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F2

from .resample import pil_resize, pillow_order


class WSIPatcherDataset(Dataset):
    """Dataset from a WSI patcher to directly read tiles on a slide: item i is (transform(tile), (x, y))."""

    def __init__(self, patcher, transform):
        self.patcher = patcher
        self.transform = transform
        self.patcher.pil = True

    def __len__(self) -> int:
        return len(self.patcher)

    def __getitem__(self, index):
        tile, x, y = self.patcher[index]
        return self.transform(tile), (x, y)


class BatchToTensor:
    """torchvision's ToTensor then Normalize on a (B, 3, H, W) uint8 batch, on whatever device it is: the same
    float operations in the same order as per image, so the same bits. On CPU one image at a time, which stays
    in cache (twice as fast as whole-batch operations here)."""

    def __init__(self, normalize: T.Normalize):
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)
        # A tensor divisor: CUDA multiplies by the reciprocal of a Python number, which can differ in the last bit.
        self.scale = torch.tensor(255.0)

    def __call__(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: the previous batch's result to refill, when it is no longer needed (fresh CPU memory costs
        more in page faults than the arithmetic)."""
        dev = batch.device
        if self.mean.device != dev:  # moved once, not per batch (a copy to a GPU can wait for its queue)
            self.mean, self.std, self.scale = self.mean.to(dev), self.std.to(dev), self.scale.to(dev)
        if out is None or out.shape != batch.shape or out.device != dev:
            out = torch.empty(batch.shape, dtype=torch.float32, device=dev)  # contiguous, whatever the batch's layout
        step = 1 if dev.type == "cpu" else max(len(batch), 1)
        for i in range(0, len(batch), step):
            o = out[i:i + step]
            o.copy_(batch[i:i + step])  # exact, and faster than a converting division
            o.div_(self.scale).sub_(self.mean).div_(self.std)
        return out


PIL_KINDS = {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic"}


class BatchTransform:
    """An encoder's Resize and CenterCrop steps, then ToTensor + Normalize, on a (B, H, W, 3) uint8 batch on its
    device. ``exact``: Pillow's resampling bit for bit (trident_lib.resample), so the batch is what the per-image
    PIL steps give; otherwise torch's, within a grey level of Pillow's (the fast read path)."""

    def __init__(self, steps, normalize: T.Normalize, exact: bool = False):
        self.steps = steps
        self.exact = exact
        self.to_tensor = BatchToTensor(normalize)

    def reproduces(self, hw: tuple[int, int]) -> bool:
        """Whether images of this size get Pillow's very bytes (always true of torch's resampling)."""
        for step in self.steps:
            size = _resized(hw, step.size) if isinstance(step, T.Resize) else tuple(step.size)
            if self.exact and isinstance(step, T.Resize) and size != hw and \
                    pillow_order(hw, size, PIL_KINDS[step.interpolation]) is None:
                return False
            hw = size
        return True

    def __call__(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        for step in self.steps:  # on (B, H, W, 3); torch's steps on its channels-last NCHW view (its fastest)
            if isinstance(step, T.Resize):
                size = _resized(tuple(batch.shape[1:3]), step.size)
                if self.exact:
                    batch = pil_resize(batch, size, PIL_KINDS[step.interpolation])
                else:
                    batch = F2.resize(batch.permute(0, 3, 1, 2), size, step.interpolation,
                                      antialias=True).permute(0, 2, 3, 1)
            else:
                batch = F2.center_crop(batch.permute(0, 3, 1, 2), list(step.size)).permute(0, 2, 3, 1)
        return self.to_tensor(batch.permute(0, 3, 1, 2), out)  # the copy to float also makes it contiguous


def _resized(hw: tuple[int, int], size) -> tuple[int, int]:
    """torchvision's output size for Resize(size): both sides, or the shorter side with the aspect ratio kept."""
    if not isinstance(size, int) and len(size) == 2:
        return int(size[0]), int(size[1])
    side = size if isinstance(size, int) else size[0]
    h, w = hw
    return (side, int(side * w / h)) if h <= w else (int(side * h / w), side)


def split_to_tensor(transform, in_batch: bool = False, exact: bool = False, patch_size: int | None = None):
    """(per_image, per_batch) for the usual [Resize, CenterCrop,] ToTensor, Normalize: per image, the PIL steps
    then (3, H, W) uint8, or with ``in_batch`` no step and (H, W, 3) uint8; per batch, on the model's device, the
    rest (a quarter of the bytes to move between processes and to the GPU). In the batch, ``exact`` resamples
    as Pillow does, and ``patch_size`` first resizes the patch as read to that size (bicubic, as WSIPatcher
    does). (transform, None) for any other transform, or an interpolation ``exact`` cannot reproduce."""
    steps = list(getattr(transform, "transforms", []))
    if (len(steps) < 2 or type(steps[-2]) is not T.ToTensor or type(steps[-1]) is not T.Normalize
            or not all(type(t) in (T.Resize, T.CenterCrop) for t in steps[:-2])):
        return transform, None
    if in_batch and any(type(t) is T.Resize and (t.max_size is not None or exact and t.interpolation not in PIL_KINDS)
                        for t in steps):
        return transform, None
    if in_batch:
        first = [T.Resize((patch_size, patch_size), T.InterpolationMode.BICUBIC)] if patch_size else []
        return _Uint8(None), BatchTransform(first + steps[:-2], steps[-1], exact)
    return _Uint8(T.Compose(steps[:-2])), BatchToTensor(steps[-1])


class _Uint8:
    def __init__(self, pil_steps):
        self.pil_steps = pil_steps

    def __call__(self, img) -> torch.Tensor:
        if self.pil_steps is None:
            # A reader's own array (fast path, resizes on the device) needs no copy; a read-only view does.
            fresh = isinstance(img, np.ndarray) and img.flags.writeable and img.flags.c_contiguous
            return torch.from_numpy(img if fresh else np.array(img))
        return torch.from_numpy(np.asarray(self.pil_steps(img)).transpose(2, 0, 1).copy())


def default_num_workers(device: str = "cpu") -> int:
    """Reader processes when none are asked for. A model on a small CPU already uses every core: a reader
    process there only preempts its threads (measured on 2 cores: end-to-end / model-only 0.84-0.89 with
    one reader process, 0.96-0.99 reading in the model's process), so read in-process. Otherwise leave one
    core for the main process; a GPU outruns every reader a machine has (bench/gpu.sh), so each GPU gets its
    share of the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if str(device).startswith("cuda"):
        return max(1, cores // max(1, torch.cuda.device_count()) - 1)
    return 0 if cores <= 4 else min(8, cores - 1)


def _lower_priority(_worker_id: int) -> None:
    # Readers yield the cores to the model and fill the prefetch queue with what is left: on a small
    # CPU machine this keeps end-to-end throughput within a few percent of the model alone.
    try:
        os.nice(10)
    except OSError:
        pass


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | None, device: str,
                batches: list[list[int]] | None = None, min_workers: int = 0) -> DataLoader:
    """Batches of ``batch_size`` items in order, or the items listed in ``batches``; read by at least
    ``min_workers`` reader processes."""
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    if len(dataset) <= batch_size:  # one batch: a reader process would only add start-up time
        workers = 0
    workers = max(workers, min_workers)
    cuda = str(device).startswith("cuda")
    return DataLoader(
        dataset,
        batch_size=batch_size if batches is None else 1,
        batch_sampler=batches,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=_lower_priority if workers else None,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
    )


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N'; a CUDA device on a machine without one is a clear error."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available on this machine; use 'cpu'.")
    return dev
