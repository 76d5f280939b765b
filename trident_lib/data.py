"""Reading tiles in worker processes while the model runs."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset


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


def default_num_workers(device: str = "cpu") -> int:
    """Reader processes when none are asked for. A model on a small CPU already uses every core: a reader
    process there only preempts its threads (measured on 2 cores: end-to-end / model-only 0.84-0.89 with
    one reader process, 0.96-0.99 reading in the model's process), so read in-process. Otherwise leave one
    core for the main process."""
    cores = os.cpu_count() or 2
    if not str(device).startswith("cuda") and cores <= 4:
        return 0
    return max(1, min(8, cores - 1))


def _lower_priority(_worker_id: int) -> None:
    # Readers yield the cores to the model and fill the prefetch queue with what is left: on a small
    # CPU machine this keeps end-to-end throughput within a few percent of the model alone.
    try:
        os.nice(10)
    except OSError:
        pass


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | None, device: str) -> DataLoader:
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    if len(dataset) <= batch_size:  # one batch: a worker process would only add start-up time
        workers = 0
    cuda = str(device).startswith("cuda")
    return DataLoader(
        dataset,
        batch_size=batch_size,
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
