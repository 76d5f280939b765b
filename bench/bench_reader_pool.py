"""Small slides through one set of reader processes vs readers started per slide.

A features step holds up to slides_per_run slides. With readers started per slide, each slide pays their
start and the pipeline's fill and drain (the first batch read while the model waits, the last one embedded
while the readers wait). patch_features_of_slides keeps one set of readers for the step, which read the next
slide while the model finishes one. Both columns run the same data path with a model that costs nothing (the
mean colour of each patch), so the figures are what readers can feed a model much faster than them, as on a
GPU: K slides of n patches of the 40x bench slide (20x / 256 px: 512-px reads of four JPEG tiles), each slide
a different part of it. Figures are patches/s; the ratio is per round, median of ROUNDS alternating rounds.
A slide of at most one reader batch (32 patches) is read in-process when started alone (readers would only
add their start), so at 32 patches the per-slide column has no reader processes.

    .venv/bin/python bench/bench_reader_pool.py [--slides 6] [--patches 32 96] [--workers 1 2]
"""

import argparse
import os
import time

import numpy as np
import torch
from bench_read import SLIDES
from common import cached_slide, save

from trident_lib import load_wsi
from trident_lib.extraction import patch_features, patch_features_of_slides
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory

ROUNDS = 3


class MeanColour(torch.nn.Module):
    """A model that costs nothing, so the data path alone sets the pace."""

    embedding_dim = 3

    def __init__(self, eval_transforms):
        super().__init__()
        self.eval_transforms = eval_transforms

    def forward(self, x):
        return x.mean((2, 3))


def median(values) -> float:
    return float(np.median(values))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--patches", type=int, nargs="*", default=[32, 96])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = MeanColour(encoder_factory("resnet50", pretrained=False).eval_transforms)
    results = {"load_before": os.getloadavg(), "cores": os.cpu_count(), "slides": args.slides}
    with load_wsi(cached_slide("bench_read_40x_aperio", SLIDES["40x"])) as wsi:
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        coords, attrs = tissue_coords(wsi, 20, 256)
        coords = coords[np.random.default_rng(0).permutation(len(coords))]
        for n in args.patches:
            slides = [(wsi, coords[i * n:(i + 1) * n], attrs) for i in range(args.slides)]
            assert all(len(c) == n for _, c, _ in slides), "the slide has too few patches for these sizes"
            for w in args.workers:
                per_slide, pooled, ratios = [], [], []
                for _ in range(ROUNDS):
                    t = time.perf_counter()
                    for one, c, a in slides:
                        patch_features(one, model, c, a, "cpu", 512, num_workers=w)
                    per_slide.append(n * len(slides) / (time.perf_counter() - t))
                    t = time.perf_counter()
                    for result in patch_features_of_slides(slides, model, "cpu", 512, num_workers=w):
                        assert not isinstance(result, Exception), result
                    pooled.append(n * len(slides) / (time.perf_counter() - t))
                    ratios.append(pooled[-1] / per_slide[-1])
                row = results[f"{n}_patches/{w}_workers"] = {
                    "per_slide": round(median(per_slide), 1), "pooled": round(median(pooled), 1),
                    "pooled_over_per_slide": round(median(ratios), 3),
                    # what starting the readers per slide costs each slide
                    "seconds_saved_per_slide": round(n / median(per_slide) - n / median(pooled), 3)}
                print(f"{args.slides} slides of {n} patches, {w} reader(s): per slide {row['per_slide']:.0f}/s, "
                      f"one pool {row['pooled']:.0f}/s, ratio {row['pooled_over_per_slide']:.2f}, "
                      f"{row['seconds_saved_per_slide']:.3f} s saved per slide", flush=True)
    results["load_after"] = os.getloadavg()
    save("reader_pool", results)


if __name__ == "__main__":
    main()
