"""Memory over a long cohort: peak RSS of the batch Processor (segmentation, coordinates, features) on a
cohort of N slides against the same on N/4 slides, each in a fresh process. Flat memory gives a ratio
near 1 (TRIDENT users saw 6 GB grow to 64 GB over 10k slides).

    .venv/bin/python bench/bench_memory.py [--slides 40]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, cached_slide, save

from trident_lib.synthetic import Ellipse, SlideSpec

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from trident_lib import Processor
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.segmentation_models import segmentation_model_factory
p = Processor({job!r}, {wsis!r})
p.run_segmentation_job(segmentation_model_factory("otsu"), device="cpu")
p.run_patching_job(20, 256)
p.run_patch_feature_extraction_job("20x_256px_0px_overlap", encoder_factory("efficientnet_lite0"), "cpu",
                                   batch_limit=32)
print(json.dumps({{"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "failed": p.failed}}))
"""


def run(n: int, slide: str, tmp: Path) -> dict:
    wsis = tmp / f"wsis{n}"
    wsis.mkdir()
    for i in range(n):
        os.symlink(slide, wsis / f"s{i:04d}.svs")
    code = CHILD.format(root=str(ROOT), job=str(tmp / f"job{n}"), wsis=str(wsis))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=40)
    args = parser.parse_args()
    slide = cached_slide("bench_memory_40x", SlideSpec(6144, 4096, seed=3, tissue=[Ellipse(3072, 2048, 2600, 1700)]))
    tmp = Path(tempfile.mkdtemp(prefix="trident-bench-memory-"))
    small = run(max(1, args.slides // 4), slide, tmp)
    large = run(args.slides, slide, tmp)
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    print(f"peak RSS, {max(1, args.slides // 4)} slides: {small['peak_rss_mib']:.0f} MiB")
    print(f"peak RSS, {args.slides} slides: {large['peak_rss_mib']:.0f} MiB   ratio {ratio:.2f} (1.00 = flat)")
    save("memory", {"small": small, "large": large, "slides": args.slides, "ratio": ratio})


if __name__ == "__main__":
    main()
