"""Seconds per slide for tissue segmentation and patch coordinates on a large synthetic 40x slide,
next to the time to read the slide's thumbnail (the baseline, measured in the same run).

    .venv/bin/python bench/bench_segmentation.py
"""

import time

from common import cached_slide, peak_rss_mib, save

from trident_lib import load_wsi
from trident_lib.patching import tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.synthetic import Ellipse, SlideSpec

W, H = 61440, 40960  # 40x (0.25 mpp): 2.5 gigapixels


def main():
    spec = SlideSpec(W, H, levels=6, seed=7, tissue=[
        Ellipse(15000, 20000, 12000, 16000), Ellipse(42000, 14000, 14000, 9000), Ellipse(45000, 31000, 9000, 7000)],
        holes=[Ellipse(15000, 20000, 3000, 4000)])
    path = cached_slide("bench_60k_40k", spec)
    seg = segmentation_model_factory("otsu")
    rows = {}
    with load_wsi(path) as wsi:
        t0 = time.perf_counter()
        wsi.get_thumbnail((1024, 1024))
        thumb = time.perf_counter() - t0
        t0 = time.perf_counter()
        gdf = wsi.segment_tissue(seg, device="cpu", holes_are_tissue=False)
        segment = time.perf_counter() - t0
        for mag, ps in ((20, 256), (40, 256), (10, 224)):
            t0 = time.perf_counter()
            coords, _ = tissue_coords(wsi, mag, ps, mask=gdf)
            rows[f"coords_{mag}x_{ps}px"] = {"seconds": time.perf_counter() - t0, "patches": len(coords)}
    print(f"slide {W} x {H} px at 40x, {len(gdf)} tissue regions")
    print(f"{'step':<22}{'seconds':>10}{'x thumbnail':>14}{'patches':>10}")
    print(f"{'thumbnail (baseline)':<22}{thumb:>10.3f}{1.0:>14.1f}")
    print(f"{'otsu segmentation':<22}{segment:>10.3f}{segment / thumb:>14.1f}")
    for name, r in rows.items():
        print(f"{name:<22}{r['seconds']:>10.3f}{r['seconds'] / thumb:>14.1f}{r['patches']:>10}")
    total = segment + rows["coords_20x_256px"]["seconds"]
    print(f"segmentation + 20x coords: {total:.2f} s per slide = {total / thumb:.1f} x the thumbnail read; "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    save("segmentation", {"thumbnail_s": thumb, "segmentation_s": segment, "coords": rows,
                          "ratio_seg_plus_coords_to_thumbnail": total / thumb, "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
