"""Which device a step runs on. On a machine with several GPUs, steps running at once must not pick the
same GPU by accident: each GPU is leased through an advisory file lock, which the kernel releases when the
holding process dies, so a crashed step never leaves a GPU blocked.

A lease is a per-node matter: the locks live in the node's local temp folder (never on shared storage, where
flock is unreliable and GPUs of different nodes would collide), and each lock is named after the physical
GPU, not its index, so workers pinned with CUDA_VISIBLE_DEVICES (each sees its GPU as cuda:0) do not block
one another."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time

LEASE_DIR = os.path.join(tempfile.gettempdir(), "trident-gpu-leases")


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def physical_gpu(index: int) -> str:
    """A name for the GPU behind ``cuda:index`` that is the same in every process of this node."""
    try:
        import torch

        return f"gpu-{torch.cuda.get_device_properties(index).uuid}"
    except Exception:  # no CUDA here (tests), or an old torch: CUDA_VISIBLE_DEVICES says which GPU it is
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return f"gpu-{visible[index] if index < len(visible) else index}"


@contextlib.contextmanager
def lease_device(device: str = "auto", wait_seconds: float = 3600.0, poll: float = 2.0):
    """Yield 'cpu' or a free 'cuda:N'. ``device`` may also name one explicitly ('cpu', 'cuda:1')."""
    if device != "auto":
        yield device
        return
    n = gpu_count()
    if n == 0:
        yield "cpu"
        return
    os.makedirs(LEASE_DIR, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    while True:
        for i in range(n):
            fd = os.open(os.path.join(LEASE_DIR, f"{physical_gpu(i)}.lock"), os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                yield f"cuda:{i}"
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {n} after {wait_seconds:.0f}s")
        time.sleep(poll)
