"""Patch-feature throughput on CPU, for the default encoder and resnet50, exact and fast path.

For each: (a) model only, on tensors already in memory; (b) read and transform only (data loader, no
model); (c) end to end; the ratio c/a; peak RSS; and, for the fast path, the cosine similarity of every
patch's features to the exact ones.

    .venv/bin/python bench/bench_features.py [--patches 2000]
"""

import argparse
import time

import numpy as np
import torch

from common import cached_slide, peak_rss_mib, save

from trident_lib import load_wsi
from trident_lib.data import WSIPatcherDataset
from trident_lib.extraction import embed_batches, patch_features, patch_loader, prepare_encoder
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import patcher_from_coords, tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.synthetic import Ellipse, SlideSpec

BATCH = 32
ROUNDS = 4


def model_only(encoder, tensors, fast):
    dev = torch.device("cpu")
    enc = prepare_encoder(encoder, dev, fast)
    batches = [(tensors[i:i + BATCH],) for i in range(0, len(tensors), BATCH)]
    embed_batches(enc, batches[:1], dev, fast)  # warm-up
    t0 = time.perf_counter()
    embed_batches(enc, batches, dev, fast)
    return len(tensors) / (time.perf_counter() - t0)


def read_only(wsi, coords, attrs, transform):
    loader, to_input = patch_loader(wsi, coords, attrs, transform, BATCH)  # patch_features' data path
    t0 = time.perf_counter()
    n = sum(len(to_input(x) if to_input else x) for x, *_ in loader)
    return n / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--patches", type=int, default=2000)
    parser.add_argument("--encoders", nargs="*", default=["efficientnet_lite0", "resnet50"])
    args = parser.parse_args()
    spec = SlideSpec(32768, 24576, levels=5, seed=11, tissue=[Ellipse(16384, 12288, 15500, 11500)])
    path = cached_slide("bench_features_40x", spec)
    results = {}
    with load_wsi(path) as wsi:
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        coords, attrs = tissue_coords(wsi, 20, 256)
        coords = coords[: args.patches]
        print(f"{len(coords)} tissue patches at 20x / 256 px, torch threads {torch.get_num_threads()}")
        for name in args.encoders:
            encoder = encoder_factory(name, pretrained=(name == "efficientnet_lite0"))
            # The machine's speed drifts over minutes (a shared VM): model-only and end-to-end are measured
            # in alternating rounds, each end-to-end round on its own quarter of the patches, and compared
            # round by round (median), so drift does not favour either side.
            sample = WSIPatcherDataset(patcher_from_coords(wsi, coords[:256], attrs), encoder.eval_transforms)
            tensors = torch.stack([sample[i][0] for i in range(len(sample))])
            b = read_only(wsi, coords, attrs, encoder.eval_transforms)
            exact = None
            for mode, fast in (("default", False), ("fast", True)):
                rounds, parts, seconds = [], [], 0.0
                for chunk in np.array_split(np.arange(len(coords)), ROUNDS):
                    a_round = model_only(encoder, tensors, fast)
                    t0 = time.perf_counter()
                    parts.append(patch_features(wsi, encoder, coords[chunk], attrs, "cpu", BATCH, fast_cpu=fast))
                    dt = time.perf_counter() - t0
                    seconds += dt
                    rounds.append((a_round, len(chunk) / dt))
                feats = np.concatenate(parts)
                a = float(np.median([r[0] for r in rounds]))
                c = len(coords) / seconds
                row = {"model_only": a, "read_transform_only": b, "end_to_end": c,
                       "c_over_a": float(np.median([r[1] / r[0] for r in rounds])),
                       "peak_rss_mib": peak_rss_mib()}
                if fast:
                    cos = np.sum(feats * exact, 1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(exact, axis=1))
                    row.update(min_cosine=float(cos.min()), mean_cosine=float(cos.mean()),
                               speedup_vs_default=c / results[f"{name}/default"]["end_to_end"])
                else:
                    exact = feats
                results[f"{name}/{mode}"] = row
    print(f"\n{'encoder/mode':<28}{'a model':>9}{'b read':>9}{'c e2e':>9}{'c/a':>7}{'RSS MiB':>9}"
          f"{'speedup':>9}{'min cos':>10}")
    for key, r in results.items():
        print(f"{key:<28}{r['model_only']:>9.1f}{r['read_transform_only']:>9.1f}{r['end_to_end']:>9.1f}"
              f"{r['c_over_a']:>7.2f}{r['peak_rss_mib']:>9.0f}{r.get('speedup_vs_default', 1):>9.2f}"
              f"{r.get('min_cosine', 1):>10.5f}")
    print("(patches/s; a = model on in-memory tensors, b = reading + transforms, c = end to end; c/a is the "
          f"median of {ROUNDS} alternating rounds)")
    save("features", results)


if __name__ == "__main__":
    main()
