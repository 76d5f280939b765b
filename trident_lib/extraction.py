"""Patch and slide feature extraction: tiles are read in worker processes while the model runs."""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque

import numpy as np
import torch
from torch.utils.data import ConcatDataset, get_worker_info
from torch.utils.data._utils import signal_handling

from .data import BatchTransform, WSIPatcherDataset, make_loader, resolve_device, split_to_tensor
from .fastpath import fast_cpu_variant
from .io import atomic_path, read_coords_h5, read_features_h5, save_features_h5
from .patching import patcher_from_coords

READER_BATCH = 32  # patches per batch a reader process makes


def autocast_context(device: torch.device, precision: torch.dtype, fast_cpu: bool = False):
    """On CUDA, the encoder's own precision (TRIDENT's behaviour). On CPU, exact fp32 unless the opt-in
    fast path asks for bf16 autocast."""
    if device.type == "cuda" and precision != torch.float32:
        return torch.autocast("cuda", dtype=precision)
    if device.type == "cpu" and fast_cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_encoder(encoder: torch.nn.Module, device: torch.device, fast_cpu: bool = False) -> torch.nn.Module:
    if fast_cpu and device.type == "cpu":
        return fast_cpu_variant(encoder.to(device).eval())
    return encoder.to(device).eval()


def embed_batches(encoder, batches, device: torch.device, fast_cpu: bool = False, to_input=None,
                  batch_size: int | None = None) -> np.ndarray:
    """Run the encoder over an iterable of (images, ...) batches; (N, D) float32. ``to_input`` turns a batch into
    the model's input once on the device (patch_loader's uint8 batches); ``batch_size`` joins the incoming
    batches into model batches of that size on the device."""
    out, inputs, pending = [], None, None
    precision = getattr(encoder, "precision", torch.float32)
    with torch.inference_mode(), autocast_context(device, precision, fast_cpu):
        for imgs in _on_device(batches, device, batch_size):
            if to_input is not None:
                imgs = inputs = to_input(imgs, inputs)  # refills the last batch's input (stream order keeps it safe)
            if fast_cpu and device.type == "cpu":
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            # One batch behind: the previous batch's features are copied back (waiting for its model) only
            # once this batch is read, moved and prepared, so that work overlaps the previous batch's model.
            if pending is not None:
                out.append(pending.float().cpu())
            pending = encoder(imgs)
    if pending is not None:
        out.append(pending.float().cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()


def _on_device(batches, device: torch.device, size: int | None):
    """The batches' images moved to the device; with ``size``, joined there into batches of that size."""
    held, n = [], 0
    for imgs, *_ in batches:
        imgs = imgs.to(device, non_blocking=True)
        if size is None:
            yield imgs
            continue
        held.append(imgs)
        n += len(imgs)
        if n >= size:
            joined = torch.cat(held) if len(held) > 1 else held[0]
            while len(joined) >= size:
                yield joined[:size]
                joined = joined[size:]
            held, n = ([joined] if len(joined) else []), len(joined)
    if held:
        yield torch.cat(held)


class _TileDataset(WSIPatcherDataset):
    """Also says, per patch, whether a damaged tile had to be replaced by a blank one (counted in the worker
    that read it, so the count survives the process boundary)."""

    in_reader = None  # in a reader process: the slide it reads now

    def __getitem__(self, index):
        wsi = self.patcher.wsi
        if get_worker_info() is not None and _TileDataset.in_reader is not wsi:
            # A reader never goes back to a slide it left (batches are handed out in order): the last one's
            # handles and caches go, so a reader serving many slides holds one slide's.
            if _TileDataset.in_reader is not None:
                _TileDataset.in_reader.release()
            _TileDataset.in_reader = wsi
        before = getattr(wsi, "blank_tiles", 0)
        img, xy = super().__getitem__(index)
        return img, xy, getattr(wsi, "blank_tiles", 0) - before


def patch_dataset(wsi, coords: np.ndarray, attrs: dict, transform, device: str = "cpu", fast_read: bool = False,
                  resize_on_device: bool | None = None):
    """(dataset, to_input): a slide's patches as the readers make them, items (patch, (x, y), blank tiles), and
    ``to_input`` (None when the items already are the model's input), which finishes a batch on the model's
    device: uint8 to normalised float. ``resize_on_device`` (by default on a GPU) leaves the resizes to
    ``to_input`` too, with Pillow's very arithmetic: the same bytes, and readers that only decode."""
    patcher = patcher_from_coords(wsi, coords, attrs, pil=True, fast_read=fast_read)
    if resize_on_device is None:
        resize_on_device = torch.device(device).type == "cuda"
    if patcher.fast_read:  # resized with torch's resampling on the device: not bit-identical to Pillow's
        per_patch, to_input = split_to_tensor(transform, in_batch=True)
    elif resize_on_device:
        # The patch as read, if at most twice the patch's side (larger ones would crowd the readers' shared
        # memory and the bus: Pillow resizes those in the reader); the encoder's steps on the device.
        whole = patcher.read_size <= 2 * patcher.patch_size_target
        per_patch, to_input = split_to_tensor(transform, in_batch=True, exact=True,
                                              patch_size=patcher.patch_size_target if whole else None)
        side = patcher.read_size if whole else patcher.patch_size_target
        if to_input is not None and to_input.reproduces((side, side)):
            patcher.resize_in_batch = whole
        else:  # sizes or steps whose Pillow bytes the device cannot reproduce: the CPU's path
            per_patch, to_input = split_to_tensor(transform)
    else:
        per_patch, to_input = split_to_tensor(transform)
    dataset = _TileDataset(patcher, per_patch)
    patcher.pil = not isinstance(to_input, BatchTransform)  # a batch that does the steps starts from arrays
    return dataset, to_input


def patch_loader(wsi, coords: np.ndarray, attrs: dict, transform, batch_size: int, num_workers: int | None = None,
                 device: str = "cpu", fast_read: bool = False, resize_on_device: bool | None = None):
    """(loader, to_input): one slide's batches of (patches, (x, y), blank-tile counts); see ``patch_dataset``."""
    dataset, to_input = patch_dataset(wsi, coords, attrs, transform, device, fast_read, resize_on_device)
    return make_loader(dataset, batch_size, num_workers, device), to_input


class _Readers:
    """Batches of several slides from one set of reader processes, which read on into the next slides while
    the model works; a batch never mixes slides. After an error, or when a slide is not read to its end, the
    readers stop, and start again at the slide asked for next."""

    def __init__(self, datasets: list, batch_size: int, num_workers: int | None, device: str):
        self.datasets, self.batch_size, self.num_workers, self.device = datasets, batch_size, num_workers, device
        self.plan, self.batches = deque(), None  # the slide of each batch the running readers will give

    def slide(self, s: int, alone: bool = False):
        """Slide ``s``'s batches; ``alone``: from readers that read nothing else (so a crash is its own)."""
        if alone or not self.plan or self.plan[0][0] != s:
            self._start(s, alone)
        read = False
        try:
            while self.plan and self.plan[0][0] == s:
                self.plan.popleft()
                yield next(self.batches)
            read = True
        finally:
            if not read:  # an error, or the model's failure: no reading on for nothing
                self.stop()

    def _start(self, first: int, alone: bool) -> None:
        self.stop()
        stop, offset = first + 1 if alone else len(self.datasets), 0
        for s in range(first, stop):
            n = len(self.datasets[s])
            self.plan += [(s, list(range(offset + a, offset + min(a + self.batch_size, n))))
                          for a in range(0, n, self.batch_size)]
            offset += n
        # Readers for a slide read alone even if it is one batch: its last ones died, they must not take
        # this process with them.
        loader = make_loader(ConcatDataset(self.datasets[first:stop]), self.batch_size, self.num_workers,
                             self.device, batches=[indices for _, indices in self.plan], min_workers=int(alone))
        self.batches = iter(loader)
        # torch's SIGCHLD handler would raise a reader's death in whatever code runs then (the model on an
        # earlier slide, say); unregistered, the death is reported by the batch the reader owed.
        if getattr(self.batches, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(self.batches))
            self.batches._worker_pids_set = False

    def stop(self) -> None:
        """The readers exit now (an exception's traceback may keep the loader alive a while)."""
        getattr(self.batches, "_shutdown_workers", lambda: None)()
        self.plan, self.batches = deque(), None


def _reader_died(e: Exception) -> bool:
    return isinstance(e, RuntimeError) and "exited unexpectedly" in str(e)  # torch's words for a dead reader


def patch_features_of_slides(slides: list, patch_encoder, device: str = "cpu", batch_limit: int = 512,
                             num_workers: int | None = None, fast_cpu: bool = False, fast_read: bool = False):
    """Per slide of ``slides`` [(wsi, coords, attrs)], in order: ((N, D) float32 features, blank tiles), or the
    exception that stopped that slide (the others carry on). One set of reader processes serves every slide,
    so they read the next slide while the model finishes one, instead of starting and draining per slide.
    Model batches never mix slides either: a slide's features are those it gets alone. A reader that dies
    (a crash in a native decoder) may have been reading ahead: the slide at hand is read again by readers of
    its own, and fails only if they die too. Lazy: a slide is embedded when its result is asked for."""
    dev = resolve_device(device)
    datasets, to_inputs, ready = [], [], {}
    for i, (wsi, coords, attrs) in enumerate(slides):
        if not len(coords):  # (0, D) without running the model
            ready[i] = (np.zeros((0, getattr(patch_encoder, "embedding_dim", None) or 0), np.float32), 0)
            continue
        try:
            dataset, to_input = patch_dataset(wsi, coords, attrs, patch_encoder.eval_transforms, device, fast_read)
        except Exception as e:  # noqa: BLE001
            ready[i] = e
            continue
        datasets.append(dataset)
        to_inputs.append(to_input)
    # Readers make small batches, joined into model batches on the device: a reader making a whole 512-patch
    # batch would leave the GPU waiting seconds for the first, and few would leave readers idle.
    readers = _Readers(datasets, min(batch_limit, READER_BATCH), num_workers, device)
    encoder, s, blanks = None, 0, []

    def embed(alone: bool):  # slide s's batches, counting its blank tiles
        blanks.clear()
        for batch in readers.slide(s, alone):
            blanks.append(int(batch[2].sum()))
            yield batch

    try:
        for i in range(len(slides)):
            if i in ready:
                yield ready.pop(i)
                continue
            try:
                if encoder is None:
                    encoder = prepare_encoder(patch_encoder, dev, fast_cpu)
                try:
                    features = embed_batches(encoder, embed(False), dev, fast_cpu, to_inputs[s], batch_limit)
                except RuntimeError as e:
                    if not _reader_died(e):
                        raise
                    features = embed_batches(encoder, embed(True), dev, fast_cpu, to_inputs[s], batch_limit)
                result = (features, sum(blanks))
            except Exception as e:  # noqa: BLE001  the slide's own error, reported with it
                result = e
            s += 1
            yield result
    finally:
        readers.stop()


def patch_features(wsi, patch_encoder, coords: np.ndarray, attrs: dict, device: str = "cpu",
                   batch_limit: int = 512, num_workers: int | None = None, fast_cpu: bool = False,
                   stats: dict | None = None, fast_read: bool = False) -> np.ndarray:
    """(N, D) float32 features of the listed patches: the one implementation behind every features output.
    Empty coordinates give (0, D) without running the model. ``stats`` (a dict) receives ``blank_tiles``:
    patches read as blank because their tiles were corrupt. ``fast_read`` decodes JPEG tiles at the reduced
    size needed (see WSIPatcher) and resizes on the model's device: faster reading, pixels about one grey level
    from the default's, features close (bench/bench_read.py) but not TRIDENT's."""
    results = patch_features_of_slides([(wsi, coords, attrs)], patch_encoder, device, batch_limit, num_workers,
                                       fast_cpu, fast_read)
    result = next(results)
    results.close()  # its readers stop now
    if isinstance(result, Exception):
        raise result
    features, blank_tiles = result
    if stats is not None:
        stats["blank_tiles"] = blank_tiles
    return features


def extract_patch_features(wsi, patch_encoder, coords_path: str, save_features: str, device: str = "cuda:0",
                           saveas: str = "h5", batch_limit: int = 512, verbose: bool = False,
                           num_workers: int | None = None, fast_cpu: bool = False,
                           provenance: dict | None = None, fast_read: bool = False) -> str:
    """Features of every patch in ``coords_path``, saved to ``<save_features>/<slide>.h5`` (or ``.pt``)."""
    if saveas not in ("h5", "pt"):
        raise ValueError(f"saveas must be 'h5' or 'pt', got {saveas!r}")
    coords_path, save_features = os.fspath(coords_path), os.fspath(save_features)
    t0 = time.perf_counter()
    coords, attrs = read_coords_h5(coords_path)
    features = patch_features(wsi, patch_encoder, coords, attrs, device, batch_limit, num_workers, fast_cpu,
                              fast_read=fast_read)
    path = os.path.join(save_features, f"{wsi.name}.{saveas}")
    if saveas == "pt":
        with atomic_path(path) as tmp:
            torch.save(torch.from_numpy(features), tmp)
    else:
        save_features_h5(path, features, coords, attrs, feature_attrs(patch_encoder, wsi.name, save_features),
                         provenance)
    if verbose:
        print(f"{wsi.name}: {len(coords)} patches in {time.perf_counter() - t0:.1f}s")
    return os.path.abspath(path)


def feature_attrs(encoder, name: str, save_dir: str) -> dict:
    return {"encoder": encoder.enc_name, "name": name, "savetodir": save_dir}


def slide_embedding(features: np.ndarray, coords: np.ndarray, attrs: dict, slide_encoder,
                    device: str = "cpu") -> np.ndarray:
    """(D,) float32 slide embedding; NaN when the slide has no patches (no tissue)."""
    if not len(features):
        return np.full((slide_encoder.embedding_dim,), np.nan, np.float32)
    dev = resolve_device(device)
    batch = {"features": torch.from_numpy(features).float()[None], "coords": torch.from_numpy(coords)[None],
             "attributes": attrs}
    slide_encoder = slide_encoder.to(dev).eval()
    with torch.inference_mode(), autocast_context(dev, getattr(slide_encoder, "precision", torch.float32)):
        return slide_encoder(batch, device=dev).float().cpu().numpy()[0].astype(np.float32)


def extract_slide_features(patch_features_path: str, slide_encoder, save_features: str, device: str = "cuda",
                           name: str | None = None, provenance: dict | None = None) -> str:
    """One embedding per slide from its patch features, saved to ``<save_features>/<slide>.h5``.
    A slide without patches gets a NaN embedding and ``status = no_tissue`` in the file's attributes."""
    patch_features_path, save_features = os.fspath(patch_features_path), os.fspath(save_features)
    if not os.path.exists(patch_features_path):
        raise FileNotFoundError(f"{patch_features_path}: patch features not found; extract them first.")
    features, coords, attrs = read_features_h5(patch_features_path)
    name = name or attrs.get("name") or os.path.splitext(os.path.basename(patch_features_path))[0]
    embedding = slide_embedding(features, coords, attrs, slide_encoder, device)
    extra = {**(provenance or {}), "status": "ok" if len(features) else "no_tissue"}
    path = os.path.join(save_features, f"{name}.h5")
    return save_features_h5(path, embedding, coords, attrs, feature_attrs(slide_encoder, name, save_features), extra)
