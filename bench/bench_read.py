"""Patch reading against its floor: our pipeline vs bare OpenSlide reads vs bare JPEG decoding, same patches.

For a 40x slide read at 20x / 256 px (levels at 1x, 4x, 16x as Aperio writes them, so each patch is a 512-px
level-0 read of four 256-px JPEG tiles, resized to 256) and a 20x slide read at 20x (one tile per patch):
  a_default   our pipeline (read, resize, transforms, batch: patch_loader, the data path of patch_features)
  a_fast      the same with fast_read (tiles decoded at the reduced size, no bicubic resize)
  a_gpu_readers  the default pipeline as it runs for a GPU, its readers' side only: they decode, and leave both
              resizes (Pillow's arithmetic, trident_lib.resample) and the float conversion to the device
              (a_default pays that conversion here, about 0.2 ms of its 5.6 ms per patch)
  a_before    the pipeline as it was: every read through OpenSlide, ToTensor + Normalize per patch
  b_openslide bare openslide.read_region of the same regions
  c_decode    bare decoding of the same JPEG tiles: bytes at tifffile's offsets, Pillow (libjpeg-turbo)
  c_imagecodecs  the same with imagecodecs (libjpeg-turbo without Pillow's parsing and copies): the floor
  c_reduced   the same tiles decoded at the fast path's reduced size (OpenCV, libjpeg's DCT scaling): its floor
each in one process and with W reader processes. Figures are patches/s per core (W processes count W cores)
and patches per CPU-second (all processes; steadier on a shared machine); ratios are per round, median of
ROUNDS alternating rounds, so drift in the machine's speed favours no column. Also: every patch's features
from fast_read vs default (cosine), for resnet50 (random weights, seed 0) and efficientnet_lite0.

    .venv/bin/python bench/bench_read.py [--patches 384] [--workers 1 2] [--slides 40x 20x]
"""

import argparse
import io
import os
import resource
import time

import cv2
import imagecodecs
import numpy as np
import openslide
import tifffile
import torch
from common import cached_slide, save
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from trident_lib import load_wsi
from trident_lib.data import WSIPatcherDataset, make_loader
from trident_lib.extraction import patch_features, patch_loader
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import patcher_from_coords, tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.synthetic import Ellipse, SlideSpec

BATCH = 64
REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}
ROUNDS = 3
SLIDES = {
    "40x": SlideSpec(16384, 12288, levels=3, level_scale=4, seed=21, tissue=[Ellipse(8192, 6144, 7900, 5900)]),
    "20x": SlideSpec(8192, 6144, mpp=0.5, app_mag=20, levels=3, level_scale=4, seed=22,
                     tissue=[Ellipse(4096, 3072, 3950, 2950)]),
}


class Bare(Dataset):
    """One bare read per item, nothing returned: OpenSlide's read_region, or decoding the region's JPEG tiles."""

    def __init__(self, path, regions, how, scale=1):
        self.path, self.regions, self.how, self.scale, self.pid = path, regions, how, scale, None

    def _open(self):
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()  # each reader process opens its own handles
        if self.how == "openslide":
            self.osr = openslide.OpenSlide(self.path)
        else:
            self.fd = os.open(self.path, os.O_RDONLY)
            with tifffile.TiffFile(self.path) as tif:
                self.pages = {(p.imagewidth, p.imagelength): (p.tilewidth, p.tilelength, p.dataoffsets,
                                                              p.databytecounts, p.jpegtables)
                              for p in tif.pages if p.is_tiled}

    def __len__(self):
        return len(self.regions)

    def __getitem__(self, i):
        self._open()
        x, y, level, size, ds, dims = self.regions[i]
        if self.how == "openslide":
            self.osr.read_region((x, y), level, (size, size))
            return 0
        tw, th, offsets, counts, tables = self.pages[dims]
        lx, ly, across = round(x / ds), round(y / ds), -(-dims[0] // tw)
        for row in range(ly // th, min(-(-(ly + size) // th), -(-dims[1] // th))):
            for col in range(lx // tw, min(-(-(lx + size) // tw), across)):
                k = row * across + col
                data = os.pread(self.fd, counts[k], offsets[k])
                if self.how == "imagecodecs":
                    imagecodecs.jpeg8_decode(data, tables=tables)
                    continue
                if tables:
                    data = tables[:-2] + data[2:]
                if self.how == "reduced":
                    cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[self.scale])
                    continue
                Image.open(io.BytesIO(data)).load()
        return 0


def run(loader):
    """(patches, wall seconds, CPU seconds of this process and its finished reader processes)."""
    c0 = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime \
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)  # batches of patches, or of 0s
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return n, wall, time.process_time() + ru.ru_utime + ru.ru_stime - c0


def loaders(wsi, path, coords, attrs, transform, workers):
    p = patcher_from_coords(wsi, coords, attrs)
    ds = wsi.level_downsamples[p.level]
    regions = [(int(x), int(y), p.level, p.read_size, ds, wsi.level_dimensions[p.level]) for x, y in coords]

    def bare(how):
        return DataLoader(Bare(path, regions, how, p.read_scale), batch_size=BATCH, num_workers=workers,
                          multiprocessing_context="fork" if workers else None)

    def ours(fast_read, on_gpu=False):
        wsi._jpeg_tiles().clear_cache()  # no tile decoded in an earlier run counts
        loader, to_input = patch_loader(wsi, coords, attrs, transform, BATCH, workers, fast_read=fast_read,
                                        resize_on_device=on_gpu)
        inputs = None
        for imgs, *_ in loader:
            if on_gpu:  # the batch's resizes and float conversion are the GPU's work, not measured here
                yield imgs
                continue
            yield (inputs := to_input(imgs, inputs)) if to_input else imgs  # as embed_batches does

    def before():
        tiles = wsi._tiles
        wsi._tiles = None  # every read through OpenSlide, as before
        try:
            yield from make_loader(WSIPatcherDataset(patcher_from_coords(wsi, coords, attrs, pil=True), transform),
                                   BATCH, workers, "cpu")
        finally:
            wsi._tiles = tiles

    return {
        "a_default": lambda: ours(False),
        "a_fast": lambda: ours(True),
        "a_gpu_readers": lambda: ours(False, on_gpu=True),
        "a_before": before,
        "b_openslide": lambda: bare("openslide"),
        "c_decode": lambda: bare("decode"),
        "c_imagecodecs": lambda: bare("imagecodecs"),
        "c_reduced": lambda: bare("reduced"),
    }


def measure(wsi, path, coords, attrs, transform, workers):
    cores = max(workers, 1)
    rounds = []
    for _ in range(ROUNDS):
        row = {}
        for name, make in loaders(wsi, path, coords, attrs, transform, workers).items():
            n, wall, cpu = run(make())
            row[name] = (n / wall / cores, n / cpu)
        rounds.append(row)
    out = {}
    for name in rounds[0]:
        out[name] = {"per_core": float(np.median([r[name][0] for r in rounds])),
                     "per_cpu_second": float(np.median([r[name][1] for r in rounds]))}
    for a in ("a_default", "a_fast", "a_gpu_readers", "a_before"):
        for base in ("b_openslide", "c_decode", "c_imagecodecs", "c_reduced", "a_default", "a_before"):
            if a != base:
                out[f"{a}/{base}"] = float(np.median([r[a][0] / r[base][0] for r in rounds]))
    return out


def cosines(wsi, coords, attrs):
    out = {}
    for name in ("resnet50", "efficientnet_lite0"):
        torch.manual_seed(0)
        enc = encoder_factory(name, pretrained=(name == "efficientnet_lite0"))
        exact = patch_features(wsi, enc, coords, attrs, "cpu", BATCH)
        fast = patch_features(wsi, enc, coords, attrs, "cpu", BATCH, fast_read=True)
        cos = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
        out[name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "patches": len(coords)}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--patches", type=int, default=384)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--cosine_patches", type=int, default=128)
    parser.add_argument("--slides", nargs="*", default=list(SLIDES))
    parser.add_argument("--name", default="read")
    args = parser.parse_args()
    torch.set_num_threads(1)  # reading is what is measured: one core per process
    transform = encoder_factory("resnet50", pretrained=False).eval_transforms
    results = {"load_before": os.getloadavg(), "cores": os.cpu_count(), "batch": BATCH}
    for mag, spec in ((m, SLIDES[m]) for m in args.slides):
        path = cached_slide(f"bench_read_{mag}_aperio", spec)
        with load_wsi(path) as wsi:
            wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
            coords, attrs = tissue_coords(wsi, 20, 256)
            rng = np.random.default_rng(0)
            coords = coords[np.sort(rng.choice(len(coords), min(args.patches, len(coords)), replace=False))]
            p = patcher_from_coords(wsi, coords, attrs)
            print(f"\n{mag} slide at 20x/256: {len(coords)} patches, level {p.level} read {p.read_size}px, "
                  f"direct tiles: {wsi._jpeg_tiles() is not None}, load {os.getloadavg()[0]:.2f}")
            res = {"patches": len(coords), "read_size": p.read_size, "level": p.level}
            for workers in [0, *args.workers]:
                key = "single_process" if workers == 0 else f"workers_{workers}"
                res[key] = r = measure(wsi, path, coords, attrs, transform, workers)
                print(f"  {key:<15}" + "".join(f"{k} {v['per_core']:6.0f}/s ({v['per_cpu_second']:4.0f}/cpu-s)  "
                                                for k, v in r.items() if isinstance(v, dict)))
                print("  " + " ".join(f"{k}={v:.2f}" for k, v in r.items() if not isinstance(v, dict)))
            if args.workers:
                one = res[f"workers_{args.workers[0]}"]
                for w in args.workers[1:]:
                    res[f"scaling_{w}_over_{args.workers[0]}"] = {
                        k: res[f"workers_{w}"][k]["per_core"] * w / (one[k]["per_core"] * args.workers[0])
                        for k in one if isinstance(one[k], dict)}
                    print(f"  scaling {w}/{args.workers[0]} workers:",
                          {k: round(v, 2) for k, v in res[f'scaling_{w}_over_{args.workers[0]}'].items()})
            if args.cosine_patches:
                res["fast_read_cosine"] = cosines(wsi, coords[:args.cosine_patches], attrs)
                print("  fast_read vs default features:", res["fast_read_cosine"])
            results[mag] = res
    results["load_after"] = os.getloadavg()
    save(args.name, results)


if __name__ == "__main__":
    main()
