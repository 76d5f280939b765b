"""Cohort tables refresh incrementally: after one new slide, the refresh reads that slide, not the cohort."""

import shutil

import dagster as dg

from trident_assets.definitions import build_definitions
from trident_assets.settings import Settings


def test_cohort_qc_rereads_only_changed_slides(tmp_path, slides):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(slides["aperio_20x"], inbox / f"{name}.svs")
    settings = Settings(inbox=str(inbox), storage=str(tmp_path / "out"))
    defs = build_definitions(settings)
    per_slide = [defs.get_assets_def(k) for k in ("slide_file", "tissue_contours")] + \
        [defs.get_assets_def(dg.AssetKey(["patch_coords", "20x_256px_0px_overlap"]))]
    qc = defs.get_assets_def("cohort_qc")

    def slides_read(instance):
        result = dg.materialize([qc], instance=instance, resources=defs.resources,
                                selection=[qc.key])
        mat = result.asset_materializations_for_node("cohort_qc")[0]
        return mat.metadata["slides_read"].value, result.output_for_node("cohort_qc")

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("slides", ["a.svs", "b.svs"])
        for key in ("a.svs", "b.svs"):
            assert dg.materialize(per_slide, partition_key=key, instance=instance, resources=defs.resources).success
        read, table = slides_read(instance)
        assert read == 2 and list(table["status"]) == ["ok", "ok"]

        instance.add_dynamic_partitions("slides", ["c.svs"])
        assert dg.materialize(per_slide, partition_key="c.svs", instance=instance, resources=defs.resources).success
        read, table = slides_read(instance)
        assert read == 1  # only the new slide
        assert list(table["slide"]) == ["a.svs", "b.svs", "c.svs"] and set(table["status"]) == {"ok"}

        read, table = slides_read(instance)
        assert read == 0 and len(table) == 3  # nothing changed: nothing read
        assert dg.materialize(per_slide, partition_key="a.svs", instance=instance, resources=defs.resources).success
        read, _ = slides_read(instance)
        assert read == 1  # a re-made slide is read again
