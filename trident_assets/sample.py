"""The sample cohort: a real H&E scan shipped with the package, and synthetic slides the platform writes
itself (known geometry, one without tissue)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trident_lib.synthetic import Ellipse, SlideSpec, write_slide


def sample_specs() -> dict[str, SlideSpec]:
    return {
        "sample-01.svs": SlideSpec(4096, 3072, tissue=[Ellipse(1500, 1200, 900, 700), Ellipse(3300, 2300, 600, 500)]),
        "sample-02.svs": SlideSpec(4096, 4096, tissue=[Ellipse(2048, 2048, 1600, 1300)], seed=2),
        "sample-03.svs": SlideSpec(2048, 1536, mpp=0.5, app_mag=20, tissue=[Ellipse(1000, 760, 700, 500)], seed=3),
        "sample-04.svs": SlideSpec(6144, 3072, tissue=[Ellipse(1500, 1500, 1000, 1000), Ellipse(4500, 1500, 1200, 900)],
                                   seed=4),
        "sample-05-blank.svs": SlideSpec(2048, 2048, tissue=[], seed=5),  # no tissue: a failed check, not a failed run
    }


REAL_SLIDE = Path(__file__).resolve().parent / "sample_slides" / "CMU-1-Small-Region.svs"  # CC0, see README there


def write_sample_cohort(inbox: str) -> list[str]:
    """Write the sample slides that are not in ``inbox`` yet; returns the paths written."""
    os.makedirs(inbox, exist_ok=True)
    written = []
    real = os.path.join(inbox, REAL_SLIDE.name)
    if not os.path.exists(real):
        written.append(shutil.copyfile(REAL_SLIDE, real))
    for name, spec in sample_specs().items():
        path = os.path.join(inbox, name)
        if not os.path.exists(path):
            written.append(write_slide(path, spec))
    return written
