"""Several slides through one set of reader processes (patch_features_of_slides, the features step's path):
each slide's features are those it gets alone, readers start once per step, and a slide whose reads fail or
crash its reader fails alone."""

import os

import numpy as np
import pytest
from conftest import fixture_slide

import trident_lib as tl
from trident_lib.extraction import patch_features, patch_features_of_slides
from trident_lib.patch_encoder_models import encoder_factory
from trident_lib.patching import tissue_coords
from trident_lib.segmentation_models import segmentation_model_factory

# A 40x slide (512-px reads), a real 20x scan and a 20x synthetic slide (256-px reads): batches of different
# sizes, which must never be mixed.
SLIDES = ["synthetic-40x.svs", "CMU-1-Small-Region.svs", "synthetic-20x.svs"]


@pytest.fixture(scope="module")
def encoder():
    return encoder_factory("efficientnet_lite0")


@pytest.fixture
def opened():
    """[(wsi, coords, attrs)] for SLIDES, 40 patches each (two reader batches and a part)."""
    wsis = [tl.load_wsi(fixture_slide(name)) for name in SLIDES]
    slides = []
    for wsi in wsis:
        wsi.segment_tissue(segmentation_model_factory("otsu"), device="cpu")
        coords, attrs = tissue_coords(wsi, 20, 256)
        slides.append((wsi, coords[np.random.default_rng(0).choice(len(coords), 40, replace=False)], attrs))
    yield slides
    for wsi in wsis:
        wsi.release()


class RecordingReaders:
    """The encoder's transform, noting which process made each patch."""

    def __init__(self, transform, folder):
        self.transform, self.folder = transform, folder

    def __call__(self, img):
        (self.folder / str(os.getpid())).touch()
        return self.transform(img)


def test_slides_share_one_set_of_readers_and_keep_their_own_features(opened, encoder, tmp_path, monkeypatch):
    alone = [patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=2) for wsi, coords, attrs in opened]
    empty = (opened[0][0], opened[0][1][:0], opened[0][2])
    monkeypatch.setattr(encoder, "eval_transforms", RecordingReaders(encoder.eval_transforms, tmp_path))
    results = list(patch_features_of_slides([opened[0], empty, *opened[1:]], encoder, "cpu", 16, num_workers=2))
    assert len(results) == 4
    assert results[1][0].shape == (0, encoder.embedding_dim) and results[1][1] == 0
    for (features, blank_tiles), want in zip([results[0], *results[2:]], alone, strict=True):
        assert blank_tiles == 0
        np.testing.assert_array_equal(features, want)  # batches never cross slides: bit for bit
    readers = {int(p.name) for p in tmp_path.iterdir()}
    assert len(readers) == 2 and os.getpid() not in readers  # two processes for three slides, not six


def _failing_reads(wsi, fail):
    """The slide object, its reads replaced by ``fail`` (the readers are forked: they inherit it)."""
    wsi.read_region = fail
    wsi.read_region_reduced = fail
    return wsi


def _raise(*_args, **_kwargs):
    raise OSError("the slide's storage went away")


def _crash(*_args, **_kwargs):
    os._exit(3)  # as a segfault in a native reader would: the process is gone, no Python exception


@pytest.mark.parametrize("fail, where", [(_raise, 1), (_crash, 0)])
def test_a_slide_whose_reads_fail_fails_alone(opened, encoder, fail, where):
    alone = [patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=0) for wsi, coords, attrs in opened]
    wsi, coords, attrs = opened[where]
    opened[where] = (_failing_reads(wsi, fail), coords, attrs)
    results = list(patch_features_of_slides(opened, encoder, "cpu", 16, num_workers=2))
    assert isinstance(results[where], Exception)
    assert ("storage went away" if fail is _raise else "exited unexpectedly") in str(results[where])
    for i, want in enumerate(alone):
        if i != where:  # the readers started again for the slides after it
            np.testing.assert_array_equal(results[i][0], want)
    with pytest.raises(Exception, match="storage went away" if fail is _raise else "exited unexpectedly"):
        patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=2)  # one slide: its error, raised
