import os
from pathlib import Path

import pytest

from trident_lib.synthetic import write_standard_slides

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("TRIDENT_SHARED_SLIDES", ROOT.parent / "shared" / "slides"))


def shared(name: str) -> str:
    path = SHARED_SLIDES / name
    assert path.exists(), f"real test slide missing: {path} (set TRIDENT_SHARED_SLIDES)"
    return str(path)


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    """Synthetic slides with known geometry (see trident_lib.synthetic.standard_specs)."""
    return write_standard_slides(str(tmp_path_factory.mktemp("synthetic")))


@pytest.fixture(scope="session")
def cmu_svs():
    return shared("CMU-1-Small-Region.svs")
