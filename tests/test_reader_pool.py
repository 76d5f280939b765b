"""Several slides through one set of reader processes (patch_features_of_slides, the features step's path):
each slide's features are those it gets alone, readers start once per step, and a slide whose reads fail or
crash its reader fails alone."""

import os
import time

import numpy as np
import pytest
from conftest import fixture_slide

import trident_lib as tl
from trident_lib import extraction
from trident_lib.extraction import patch_dataset, patch_features, patch_features_of_slides
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


def _note(folder, *what) -> None:
    """A file per event, so that reader processes can report to the test."""
    (folder / "-".join(map(str, (*what, os.getpid(), time.monotonic_ns())))).touch()


def _notes(folder, kind: str) -> set[tuple[int, str]]:
    """{(pid, slide name)} of the events of that kind."""
    return {(int(p.name.split("-")[-2]), "-".join(p.name.split("-")[1:-2])) for p in folder.glob(f"{kind}-*")}


def test_slides_share_one_set_of_readers_and_keep_their_own_features(opened, encoder, tmp_path, monkeypatch):
    alone = [patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=2) for wsi, coords, attrs in opened]
    read, release = extraction._TileDataset.__getitem__, type(opened[0][0]).release

    def reading(self, index):
        _note(tmp_path, "read", self.patcher.wsi.name)
        return read(self, index)

    def releasing(self):
        _note(tmp_path, "released", self.name)
        return release(self)

    monkeypatch.setattr(extraction._TileDataset, "__getitem__", reading)
    monkeypatch.setattr(type(opened[0][0]), "release", releasing)
    empty = (opened[0][0], opened[0][1][:0], opened[0][2])
    results = list(patch_features_of_slides([opened[0], empty, *opened[1:]], encoder, "cpu", 16, num_workers=2))
    assert len(results) == 4
    assert results[1][0].shape == (0, encoder.embedding_dim) and results[1][1] == 0
    for (features, blank_tiles), want in zip([results[0], *results[2:]], alone, strict=True):
        assert blank_tiles == 0
        np.testing.assert_array_equal(features, want)  # batches never cross slides: bit for bit
    reads = _notes(tmp_path, "read")
    readers = {pid for pid, _ in reads}
    assert len(readers) == 2 and os.getpid() not in readers  # two processes for three slides, not six
    order = [wsi.name for wsi, _, _ in opened]
    for pid in readers:  # each reader let go of every slide it left, and of no other
        left = sorted({name for p, name in reads if p == pid}, key=order.index)[:-1]
        assert {name for p, name in _notes(tmp_path, "released") if p == pid} == set(left)


def _failing_reads(wsi, fail):
    """The slide object, its reads replaced by ``fail`` (the readers are forked: they inherit it)."""
    wsi.read_region = fail
    wsi.read_region_reduced = fail
    return wsi


def _raise(*_args, **_kwargs):
    raise OSError("the slide's storage went away")


def _crash(*_args, **_kwargs):
    os._exit(3)  # as a segfault in a native reader would: the process is gone, no Python exception


@pytest.mark.parametrize("fail, where", [(_raise, 1), (_crash, 0), (_crash, 2)])
def test_a_slide_whose_reads_fail_fails_alone(opened, encoder, fail, where):
    """Readers read ahead while the model works on earlier slides: a reader that dies on a later slide
    must not fail the slide the model is on."""
    alone = [patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=0) for wsi, coords, attrs in opened]
    wsi, coords, attrs = opened[where]
    opened[where] = (_failing_reads(wsi, fail), coords, attrs)
    results = list(patch_features_of_slides(opened, encoder, "cpu", 16, num_workers=2))
    message = "storage went away" if fail is _raise else "exited unexpectedly"
    assert isinstance(results[where], Exception) and message in str(results[where])
    for i, want in enumerate(alone):
        if i != where:  # the readers started again for the slides after it
            np.testing.assert_array_equal(results[i][0], want)
    if fail is _raise:
        with pytest.raises(OSError, match=message):  # one slide: its error, raised
            patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=2)


def test_a_model_error_fails_its_slide_alone(opened, encoder, monkeypatch):
    alone = [patch_features(wsi, encoder, coords, attrs, "cpu", 16, num_workers=0) for wsi, coords, attrs in opened]
    forward, calls = encoder.forward, []

    def failing_on_slide_1(x):  # 40 patches per slide, model batches of 16: calls 4-6 are slide 1's
        calls.append(len(x))
        if len(calls) == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(x)

    monkeypatch.setattr(encoder, "forward", failing_on_slide_1)
    results = list(patch_features_of_slides(opened, encoder, "cpu", 16, num_workers=2))
    assert isinstance(results[1], RuntimeError) and "out of memory" in str(results[1])
    np.testing.assert_array_equal(results[0][0], alone[0])
    np.testing.assert_array_equal(results[2][0], alone[2])


def _crash_soon(*_args, **_kwargs):
    time.sleep(1)
    os._exit(3)


def test_a_reader_death_is_reported_where_its_batch_is_asked_for(opened, encoder):
    """Not by torch's SIGCHLD handler, which would raise it in whatever this process does at that moment."""
    wsi, coords, attrs = opened[1]
    opened[1] = (_failing_reads(wsi, _crash_soon), coords, attrs)
    datasets = [patch_dataset(*slide, encoder.eval_transforms)[0] for slide in opened[:2]]
    readers = extraction._Readers(datasets, 16, 2, "cpu")
    assert len(list(readers.slide(0))) == 3  # meanwhile the readers read on into slide 1, and die there
    time.sleep(3)  # the step's own work between slides (writing, logging): not interrupted
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(readers.slide(1))
    readers.stop()
