"""GPU throughput: model alone vs end to end (reading included), default and fast read, one GPU.

On a generated 40x slide (levels at 1x, 4x, 16x as Aperio writes them) read at 20x / 256 px:
  exactness        the default path's model input made on the device (resizes there) vs on the CPU: max |diff|
  reader scaling   patches/s of the data path alone (patch_loader) with W reader processes, W = 1, 2, 4, ...:
                   resizing in the readers (the CPU's default), leaving it to the device (a GPU's), fast read
  model only       the encoder on batches already on the GPU (what end to end can at best reach)
  end to end       patch_features: reading, transforms, batching, transfer and model together, over one long
                   run, over 8 calls of one slide's patches each (readers started per slide) and over the same
                   8 slides through one set of readers (patch_features_of_slides: the features step's way)
for uni_v1 (ViT-L/16, random weights) and resnet50, fp16 and bf16 autocast, batch 256 and 512 (model only;
end to end at the larger), default and fast_read; also nvJPEG (torchvision.io.decode_jpeg on the GPU) on the
slide's tiles, to say whether decoding there would pay; and the agreement (minimum cosine over 64 patches) of
the device's features, autocast, default and fast read, with fp32 features computed on the CPU. Results go to
<out>/gpu.json, rewritten after every measurement so a run cut short keeps what it measured. Run by
bench/gpu.sh; ``--small`` is its CPU fallback.

    python bench/bench_gpu.py --out DIR [--small] [--budget 240]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trident_lib import load_wsi
from trident_lib.data import default_num_workers
from trident_lib.extraction import (
    READER_BATCH,
    embed_batches,
    patch_features,
    patch_features_of_slides,
    patch_loader,
    prepare_encoder,
)
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.synthetic import Ellipse, SlideSpec, write_slide

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--small", action="store_true", help="CPU fallback: a small slide, few patches, small batches")
    p.add_argument("--budget", type=float, default=240, help="seconds; measurements past it are skipped")
    args = p.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.small
    device = "cuda" if cuda else "cpu"
    cores = os.cpu_count() or 1
    if cuda:
        size, patches, batches, workers_list = (16384, 12288), 12000, (256, 512), [1, 2, 4, 8, 16]
    else:
        size, patches, batches, workers_list = (4096, 3072), 48, (2, 4), [1, 2]
    workers = default_num_workers(device)  # what patch_features uses when not told
    workers_list = [w for w in workers_list if w <= max(cores, 2)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "cores": cores, "threads_per_core": threads_per_core(), "reader_workers": workers,
               "load_before": os.getloadavg(), "small": not cuda}

    def save():
        results["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "gpu.json").write_text(json.dumps(results, indent=2))

    def left():
        return args.budget - (time.perf_counter() - t_start)

    t0 = time.perf_counter()
    path = os.path.join(tempfile.gettempdir(), "trident_bench_gpu_40x.svs")  # not in OUT: it would travel back
    spec = SlideSpec(*size, levels=3, level_scale=4, seed=31,
                     tissue=[Ellipse(size[0] / 2, size[1] / 2, size[0] * 0.48, size[1] * 0.48)])
    write_slide(path, spec)
    wsi = load_wsi(path)
    wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
    coords, attrs = tissue_coords(wsi, 20, 256)
    tissue = len(coords)
    # The slide's patches again and again (each read decodes its tiles anew: no cache holds a whole slide).
    coords = np.tile(coords, (-(-patches // tissue), 1))[:patches]
    results["slide"] = {"size": size, "tissue_patches": tissue, "patches_per_run": len(coords),
                        "setup_seconds": round(time.perf_counter() - t0, 1)}
    print(f"slide {size}, {tissue} tissue patches, runs of {len(coords)}, {device}, {cores} cores", flush=True)
    save()

    transform = encoder_factory("resnet50", pretrained=False).eval_transforms
    # The default path's batches on the device (both resizes there, trident_lib.resample) against the CPU's
    # (Pillow in the readers): the same bits.
    cpu_loader, cpu_input = patch_loader(wsi, coords[:64], attrs, transform, 32, 0, "cpu")
    dev_loader, dev_input = patch_loader(wsi, coords[:64], attrs, transform, 32, 0, device, resize_on_device=True)
    diffs = [(cpu_input(a[0]) - dev_input(b[0].to(device)).cpu()).abs().max().item()
             for a, b in zip(cpu_loader, dev_loader)]
    results["default_batches_max_abs_diff_device_vs_cpu"] = max(diffs)
    save()

    # Readers: resizing in them (the default on the CPU), leaving it to the device (the default on a GPU), fast.
    results["reader_scaling"] = {}
    for mode in ("default", "default_resize_on_device", "fast"):
        for w in workers_list:
            if left() < 20:
                break
            n = min(len(coords), (600 if cuda else 32) * w)
            loader, _ = patch_loader(wsi, coords[:n], attrs, transform, READER_BATCH, w, "cpu",
                                     fast_read=mode == "fast", resize_on_device=mode.endswith("on_device"))
            t = time.perf_counter()
            done = sum(len(b[0]) for b in loader)
            rate = done / (time.perf_counter() - t)
            results["reader_scaling"][f"{mode}/{w}"] = round(rate, 1)
            print(f"reader {mode} {w} workers: {rate:.0f} patches/s", flush=True)
            save()

    results["nvjpeg"] = nvjpeg(path, device)
    save()

    results["models"] = {}
    for name in ("uni_v1", "resnet50"):
        torch.manual_seed(0)
        enc = encoder_factory(name, pretrained=False)
        # Agreement: the device's features (autocast, default and fast read) against fp32 on the CPU.
        check = coords[:min(tissue, 64 if cuda else 8)]
        enc.precision = torch.float32
        reference = patch_features(wsi, enc, check, attrs, "cpu", 32, num_workers=workers)
        for prec, dtype in PRECISIONS.items():
            enc.precision = dtype  # the autocast dtype embed_batches uses on CUDA
            row = results["models"][f"{name}/{prec}"] = {}
            for fast in (False, True):
                got = patch_features(wsi, enc, check, attrs, device, 64, num_workers=workers, fast_read=fast)
                row[f"cosine_min_vs_cpu_fp32/{'fast' if fast else 'default'}"] = round(min_cosine(got, reference), 5)
            model = prepare_encoder(enc, torch.device(device))
            x = torch.randn(max(batches), 3, 224, 224, device=device)
            for b in batches:
                if left() < 15:
                    break
                row[f"model_only/{b}"] = model_only(model, x[:b], device, cuda)
            for fast in (False, True):
                if left() < 30:
                    row["skipped"] = "time budget"
                    break
                b = max(batches)
                n = len(coords) if cuda else b
                t = time.perf_counter()
                patch_features(wsi, enc, coords[:n], attrs, device, b, num_workers=workers, fast_read=fast)
                rate = n / (time.perf_counter() - t)
                key = "fast" if fast else "default"
                row[f"end_to_end/{key}/{b}"] = round(rate, 1)
                row[f"end_to_end_over_model_only/{key}/{b}"] = round(rate / row[f"model_only/{b}"], 3)
                if prec != "bf16":
                    continue
                # The platform's case, 8 slides of the slide's patches: readers started per slide (one call
                # each, as before), and one set of readers for all of them (the features step's way now).
                m = tissue if cuda else b
                t = time.perf_counter()
                for _ in range(8):
                    patch_features(wsi, enc, coords[:m], attrs, device, b, num_workers=workers, fast_read=fast)
                row[f"per_slide_of_{m}/{key}/{b}"] = round(8 * m / (time.perf_counter() - t), 1)
                t = time.perf_counter()
                for _ in patch_features_of_slides([(wsi, coords[:m], attrs)] * 8, enc, device, b,
                                                  num_workers=workers, fast_read=fast):
                    pass
                row[f"one_pool_{m}_x8/{key}/{b}"] = round(8 * m / (time.perf_counter() - t), 1)
            print(f"{name} {prec}: {row}", flush=True)
            save()
        del enc
        if cuda:
            torch.cuda.empty_cache()
    results["load_after"] = os.getloadavg()
    save()
    print(f"wrote {out / 'gpu.json'} in {time.perf_counter() - t_start:.0f}s")


def threads_per_core() -> int | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        return int(next(line.split(":")[1] for line in out.splitlines() if line.startswith("Thread(s) per core")))
    except Exception:  # noqa: BLE001  information only
        return None


def min_cosine(a, b) -> float:
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def model_only(model, x, device, cuda) -> float:
    """Patches/s of the encoder on a batch already on the device, through embed_batches (autocast as there)."""
    dev = torch.device(device)
    embed_batches(model, [(x,)], dev)  # warm-up: kernels chosen, weights cast
    reps = 10 if cuda else 1
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    embed_batches(model, [(x,)] * reps, dev)  # ends in .cpu(): synchronised
    return round(reps * len(x) / (time.perf_counter() - t), 1)


def nvjpeg(path, device) -> dict:
    """Tiles/s decoding level 0's JPEG tiles with torchvision.io.decode_jpeg, batched, on the device."""
    import tifffile
    from torchvision.io import decode_jpeg

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        with open(path, "rb") as f:
            tiles = []
            for off, n in list(zip(page.dataoffsets, page.databytecounts))[:512]:
                f.seek(off)
                tiles.append(torch.frombuffer(bytearray(f.read(n)), dtype=torch.uint8))
    try:
        decode_jpeg(tiles[:8], device=device)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            decode_jpeg(tiles, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return {"tiles_per_s": round(3 * len(tiles) / (time.perf_counter() - t), 1), "tiles": len(tiles)}
    except Exception as e:  # noqa: BLE001  a measurement, not a requirement
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    main()
