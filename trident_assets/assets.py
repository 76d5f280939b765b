"""The asset graph: slide file -> tissue contours -> patch coords -> patch features -> slide embeddings,
plus cohort tables. Each asset body calls trident_lib and reports metadata; factories make one asset per
configured encoder (and one coordinates asset per patch setting)."""


import contextlib
import os
import socket
import time
import warnings
from typing import Callable

import dagster as dg
import numpy as np
import pandas as pd

import trident_lib
from trident_lib import load_wsi
from trident_lib.contours import empty_gdf
from trident_lib.devices import lease_device
from trident_lib.errors import SlideError, TooLowResolutionError
from trident_lib.extraction import feature_attrs, patch_features_of_slides, slide_embedding
from trident_lib.model_cache import cached_model
from trident_lib.patch_encoder_models import encoder_factory, encoder_spec
from trident_lib.patching import draw_coords, max_plausible_patches, tissue_coords
from trident_lib.segmentation import segment_tissue
from trident_lib.segmentation_models import segmentation_model_factory
from trident_lib.slide_encoder_models import encoder_factory as slide_encoder_factory
from trident_lib.weights import find_weights

from .inbox import SlideFile, local_path, redact, scan_inbox
from .io_managers import COORDS_DIR_KEY, Coords, Features, Tissue, TridentIOManager, markdown_table, picture_md
from .settings import Settings, version_of, weights_fingerprint

slides = dg.DynamicPartitionsDefinition(name="slides")
PER_SLIDE = dg.AssetSelection.groups("slides", "features")  # the assets partitioned by slide
warnings.filterwarnings("ignore", category=dg.BetaWarning, message=".*backfill_policy.*")

LIB = trident_lib.__version__
GPU_TAGS = {
    # k8s_job_executor: one GPU per step, on a GPU node (the NVIDIA device plugin's label and taint; a cluster
    # with other names overrides them with the executor's per_step_k8s_config). celery executor: route to the
    # workers listening on "gpu".
    # Reader processes hand batches over in /dev/shm, which a pod limits to 64 MB: mount a memory-backed one.
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}},
                             "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}]},
        "pod_spec_config": {"node_selector": {"nvidia.com/gpu.present": "true"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                            "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}}]},
    },
    "dagster-celery/queue": "gpu",
}


class Inbox(dg.ConfigurableResource):
    """Where slides arrive. Its scan is the one place that maps slide keys to files."""

    path: str
    cache_dir: str = "data/slide-cache"  # local copies of remote slides (OpenSlide needs a file)
    cache_max_gb: float = 50.0
    extensions: list[str] = []

    def scan(self) -> dict[str, SlideFile]:
        return scan_inbox(self.path, tuple(self.extensions))

    def open(self, slide: SlideFile, in_use=(), **kwargs):
        """The slide, opened; ``in_use``: other slides open alongside, whose cached copies must stay."""
        path = local_path(slide, self.cache_dir, int(self.cache_max_gb * 2**30), in_use)
        return load_wsi(path, mpp=slide.mpp, name=slide.key, **kwargs)


# -- helpers shared by the asset bodies ------------------------------------------------------------------

BAD_INPUT = (SlideError, ValueError, ImportError, FileNotFoundError, PermissionError)
# Transient errors (a flaky network filesystem read, say) are retried a bounded number of times;
# bad input is not: retrying cannot fix a broken file.
RETRY = dg.RetryPolicy(max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL)


def for_each_slide(context, values: dict, fn: Callable, on_error: Callable[[str, str], object]) -> dict:
    """Run ``fn(key, value)`` per slide. In a batch, a slide that fails gets ``on_error(key, message)`` (a
    valid empty output with status 'error' and a failed check) and the others carry on. A step with a single
    slide fails with the slide's error, so its run shows it; transient errors there are retried (RETRY)."""
    results = {}
    for key, value in values.items():
        t0 = time.perf_counter()
        try:
            results[key] = fn(key, value)
        except (*BAD_INPUT, OSError, RuntimeError) as e:
            if len(values) == 1:
                if isinstance(e, BAD_INPUT):
                    raise dg.Failure(description=str(e), metadata={"slide": key}, allow_retries=False) from e
                raise
            context.log.error(f"{key}: {e}")
            results[key] = on_error(key, str(e))
        context.log.info(f"{key}: {time.perf_counter() - t0:.2f}s")
    return results


def open_slides(inbox: "Inbox", stack: contextlib.ExitStack, files: dict[str, SlideFile]) -> dict:
    """Slide key -> the open slide (closed with ``stack``), or the error opening it raised, for its step to
    report with that slide."""
    wsis = {}
    for key, slide in files.items():
        try:
            wsis[key] = stack.enter_context(inbox.open(slide, in_use=files.values()))
        except Exception as e:  # noqa: BLE001
            wsis[key] = e
    return wsis


def warm_model(context, kind: str, name: str, weights, device: str, build: Callable, **options):
    """The model from this process's cache: a Celery worker keeps it between steps (and slides), so a cohort
    loads each model once per worker. The step log says whether it was loaded or reused, and where."""
    model, how, seconds = cached_model(kind, name, weights, device, build, **options)
    context.log.info(f"model {how}: {name} on {device} in worker {socket.gethostname()}:{os.getpid()} "
                     f"({seconds:.2f}s)")
    return model


def error_coords_attrs(key: str, pe) -> dict:
    """Contract attributes for the empty coords of a slide that could not be processed."""
    return {"patch_size": pe.patch_size, "patch_size_level0": 0, "level0_magnification": 0,
            "target_magnification": pe.mag, "overlap": pe.overlap, "name": key, "savetodir": pe.coords_dir,
            "level0_width": 0, "level0_height": 0}


def status_of(provenance: dict) -> str:
    return str(provenance.get("status", "ok"))


def check(name: str, asset_key, failing: dict[str, str], total: int,
          severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name, asset_key=asset_key, passed=not failing, severity=severity,
        metadata={"slides_checked": total, "failing": dg.MetadataValue.json(failing)},
    )


def single_metadata(results: dict, make: Callable[[str, object], dict]) -> dict:
    """Per-slide metadata when the step holds one slide; counts when it holds a batch."""
    if len(results) == 1:
        (key, value), = results.items()
        return make(key, value)
    return {"slides": len(results)}


# -- assets ---------------------------------------------------------------------------------------------

def build_assets(settings: Settings) -> list:
    # Per-slide assets carry no automation condition: every sensor run and backfill covers all of a slide's
    # stages, and evaluating a condition over every slide partition costs seconds per tick at 10,000 slides.
    # The automation sensor keeps the cohort tables current.
    backfill = dg.BackfillPolicy.multi_run(max_partitions_per_run=settings.slides_per_run)
    common = dict(partitions_def=slides, io_manager_key="trident_io",
                  backfill_policy=backfill, retry_policy=RETRY)

    @dg.asset(**common, group_name="slides", code_version=f"slide-file-{LIB}", kinds={"file"},
              description="The slide file behind each slide id: path, original name, size, mpp override.")
    def slide_file(context: dg.AssetExecutionContext, inbox: Inbox):
        found = inbox.scan()
        out, missing = {}, {}
        for key in context.partition_keys:
            if key in found:
                out[key] = found[key]
            else:
                missing[key] = f"{key}: no file for this slide in {redact(inbox.path)} (deleted or renamed)."
        if missing:
            raise dg.Failure(description="; ".join(missing.values()), metadata={"missing": list(missing)},
                             allow_retries=False)
        meta = single_metadata(out, lambda k, s: {"file_name": s.name, "path": redact(s.path), "size_bytes": s.size,
                                                 "mpp_override": s.mpp if s.mpp else "none"})
        version = dg.DataVersion(next(iter(out.values())).fingerprint) if len(out) == 1 else None
        return dg.Output(out, metadata=meta, data_version=version)

    seg_version = version_of(LIB, settings.segmenter, settings.seg_conf_thresh, settings.holes_are_tissue,
                             weights_fingerprint(settings.segmenter_weights_path))

    @dg.asset(**common, group_name="slides", code_version=seg_version, kinds={"geojson"},
              check_specs=[dg.AssetCheckSpec("tissue_found", asset="tissue_contours")],
              description=f"Tissue polygons ({settings.segmenter}), GeoJSON in level-0 pixels; QuPath-compatible.")
    def tissue_contours(context: dg.AssetExecutionContext, inbox: Inbox, trident_io: dg.ResourceParam[TridentIOManager],
                        slide_file: dict):
        # Otsu runs on the CPU: it must not hold a GPU that a features step is waiting for.
        cpu_only = settings.segmenter == "otsu"
        with contextlib.nullcontext("cpu") if cpu_only else lease_device(settings.device) as device:
            model = segmentation_model_factory(settings.segmenter, confidence_thresh=settings.seg_conf_thresh,
                                               weights_path=settings.segmenter_weights_path)

            def one(key, sf: SlideFile):
                t0 = time.perf_counter()
                with inbox.open(sf) as wsi:
                    gdf = segment_tissue(wsi, model, holes_are_tissue=settings.holes_are_tissue, device=device,
                                         batch_size=settings.seg_batch_size)
                    pictures = trident_io.save_pictures(wsi, gdf, key)
                    facts = {"mpp": wsi.mpp, "magnification": wsi.mag, "width": wsi.width, "height": wsi.height}
                prov = {"status": "ok" if len(gdf) else "no_tissue", "segmenter": settings.segmenter,
                        "seconds": round(time.perf_counter() - t0, 3), "source": sf.relpath, **facts}
                return Tissue(gdf, prov), pictures

            done = for_each_slide(context, slide_file, one, lambda k, e: (
                Tissue(empty_gdf(), {"status": "error", "error": e}), None))
        out = {k: t for k, (t, _) in done.items()}
        failing = {k: t.provenance.get("error", t.provenance["status"]) for k, t in out.items()
                   if not len(t.gdf)}
        yield dg.Output(out, metadata=single_metadata(done, lambda k, v: {
            "status": status_of(v[0].provenance), "regions": len(v[0].gdf),
            "tissue_area_px": float(v[0].gdf.area.sum()), "mpp": v[0].provenance["mpp"],
            "magnification": v[0].provenance["magnification"], "seconds": v[0].provenance["seconds"],
            "contours": v[1]["md"], "picture_path": v[1]["contours"]}))
        yield check("tissue_found", context.asset_key, failing, len(out))

    outputs = [slide_file, tissue_contours]
    for coords_dir, pe in settings.coords_configs.items():
        outputs.append(_coords_asset(settings, coords_dir, pe, common))
    for pe in settings.patch_encoders:
        outputs.append(_features_asset(settings, pe, common))
    for se in settings.slide_encoders:
        outputs.append(_embedding_asset(settings, se, common))
        outputs.append(_cohort_embeddings_asset(settings, se))
    outputs.append(_qc_asset(settings))
    return outputs


def _coords_asset(settings: Settings, coords_dir: str, pe, common):
    key = dg.AssetKey(["patch_coords", coords_dir])
    version = version_of(LIB, pe.mag, pe.patch_size, pe.overlap, settings.min_tissue_proportion,
                         settings.use_measured_mpp, settings.max_upsampling)

    @dg.asset(**common, key=key, group_name="slides", code_version=version, kinds={"hdf5"},
              ins={"tissue_contours": dg.AssetIn("tissue_contours"), "slide_file": dg.AssetIn("slide_file")},
              metadata={COORDS_DIR_KEY: coords_dir},
              check_specs=[dg.AssetCheckSpec("coords_valid", asset=key,
                                             description="non-empty and inside the slide")],
              description=f"Tissue patch coordinates at {coords_dir} (TRIDENT coords HDF5).")
    def patch_coords(context: dg.AssetExecutionContext, inbox: Inbox, slide_file: dict, tissue_contours: dict):
        def failed(k, error):
            empty = np.zeros((0, 2), np.int64)
            return Coords(empty, error_coords_attrs(k, pe), {"status": "error", "error": error}), None

        def one(k, tissue: Tissue):
            if status_of(tissue.provenance) == "error":
                return failed(k, tissue.provenance.get("error", "upstream error"))
            with inbox.open(slide_file[k]) as wsi:
                try:
                    coords, attrs = tissue_coords(wsi, pe.mag, pe.patch_size, pe.overlap,
                                                  settings.min_tissue_proportion, mask=tissue.gdf,
                                                  use_measured_mpp=settings.use_measured_mpp, save_dir=coords_dir,
                                                  max_upsampling=settings.max_upsampling)
                except TooLowResolutionError as e:  # a property of the scan, like no tissue: not a failed run
                    context.log.warning(str(e))
                    empty = np.zeros((0, 2), np.int64)
                    return Coords(empty, error_coords_attrs(k, pe), {"status": e.status, "error": str(e)}), None
                # The grid picture only shows in single-slide metadata: do not draw it for every slide of a batch.
                grid = picture_md(draw_coords(wsi, coords, attrs["patch_size_level0"], contours=tissue.gdf)) \
                    if len(tissue_contours) == 1 else None
            status = "ok" if len(coords) else "no_tissue"
            return Coords(coords, attrs, {"status": status}), grid

        done = for_each_slide(context, tissue_contours, one, failed)
        out = {k: c for k, (c, _) in done.items()}
        failing = {}
        for k, c in out.items():
            if not len(c.coords):
                failing[k] = c.provenance.get("error", "no patches")
            elif (c.coords < 0).any() or (c.coords[:, 0] >= c.attrs["level0_width"]).any() or \
                    (c.coords[:, 1] >= c.attrs["level0_height"]).any():
                failing[k] = "coordinates outside the slide"
            elif len(c.coords) > (most := max_plausible_patches(tissue_contours[k].gdf, c.attrs)):
                failing[k] = f"{len(c.coords)} patches where the tissue area holds at most {most}"
        yield dg.Output(out, metadata=single_metadata(done, lambda k, v: {
            "status": status_of(v[0].provenance), "patches": len(v[0].coords),
            "patch_size_level0": v[0].attrs.get("patch_size_level0", 0), "grid": v[1] or "none"}))
        yield check("coords_valid", context.asset_key, failing, len(out))

    return patch_coords


def _encoder_weights(name: str, weights_path: str | None) -> str | None:
    spec = encoder_spec(name)
    try:
        return find_weights(name, weights_path, spec.hub_repo, spec.weight_files)
    except Exception:  # not available here: the step will say so when it runs
        return spec.packaged_weights() if spec.packaged_weights and not weights_path else None


def _features_asset(settings: Settings, pe, common):
    key = dg.AssetKey(["patch_features", pe.name])
    coords_key = dg.AssetKey(["patch_coords", pe.coords_dir])
    version = version_of(LIB, pe.name, pe.coords_dir, weights_fingerprint(_encoder_weights(pe.name, pe.weights_path)),
                         pe.fast_cpu, pe.fast_read)

    @dg.asset(**common, key=key, group_name="features", code_version=version, kinds={"hdf5", "pytorch"},
              pool="gpu", op_tags=GPU_TAGS,
              ins={"patch_coords": dg.AssetIn(coords_key), "slide_file": dg.AssetIn("slide_file")},
              metadata={COORDS_DIR_KEY: pe.coords_dir},
              check_specs=[dg.AssetCheckSpec("features_valid", asset=key,
                                             description="finite, one row per patch, the encoder's width"),
                           dg.AssetCheckSpec("tiles_readable", asset=key,
                                             description="no patch had to be read as blank (corrupt tiles)")],
              description=f"Patch features from {pe.name} at {pe.coords_dir} (GPU pool).")
    def features(context: dg.AssetExecutionContext, inbox: Inbox, slide_file: dict, patch_coords: dict):
        with lease_device(settings.device) as device:
            t0 = time.perf_counter()
            encoder = warm_model(context, "patch", pe.name, _encoder_weights(pe.name, pe.weights_path), device,
                                 lambda: encoder_factory(pe.name, weights_path=pe.weights_path))
            load_seconds = time.perf_counter() - t0
            prov = {"encoder": pe.name, "weights_sha256": encoder.weights_sha256 or "none", "device": device,
                    "fast_cpu": pe.fast_cpu and device == "cpu", "fast_read": pe.fast_read}

            def empty(k, c: Coords, status: dict):
                return Features(np.zeros((0, encoder.embedding_dim), np.float32), c.coords, c.attrs,
                                feature_attrs(encoder, k, pe.coords_dir), {**prov, **status})

            def pending(c: Coords) -> bool:
                return status_of(c.provenance) != "error" and len(c.coords) > 0

            def one(k, c: Coords):
                if not pending(c):
                    return empty(k, c, {key: v for key, v in c.provenance.items() if key in ("status", "error")})
                if isinstance(wsis[k], Exception):
                    raise wsis[k]
                t = time.perf_counter()
                result = next(results)  # this slide's, as they come in the order of `todo`
                if isinstance(result, Exception):
                    raise result
                feats, blank_tiles = result
                secs = time.perf_counter() - t
                return Features(feats, c.coords, c.attrs, feature_attrs(encoder, k, pe.coords_dir),
                                {**prov, "status": "ok", "seconds": round(secs, 3), "blank_tiles": blank_tiles,
                                 "patches_per_second": round(len(feats) / max(secs, 1e-9), 1)})

            with contextlib.ExitStack() as stack:
                # The step's slides share one set of reader processes (patch_features_of_slides), so all are
                # opened first; one that cannot be opened fails alone, when its turn comes.
                wsis = open_slides(inbox, stack, {k: slide_file[k] for k, c in patch_coords.items() if pending(c)})
                todo = [k for k, wsi in wsis.items() if not isinstance(wsi, Exception)]
                results = patch_features_of_slides(
                    [(wsis[k], patch_coords[k].coords, patch_coords[k].attrs) for k in todo], encoder, device,
                    pe.batch_size, fast_cpu=pe.fast_cpu, fast_read=pe.fast_read)
                stack.callback(results.close)  # its readers stop before the slides close
                out = for_each_slide(context, patch_coords, one,
                                     lambda k, e: empty(k, patch_coords[k], {"status": "error", "error": e}))
        failing = {}
        for k, f in out.items():
            if status_of(f.provenance) == "error":
                failing[k] = f.provenance.get("error", "error")
            elif f.features.shape != (len(f.coords), encoder.embedding_dim):
                failing[k] = f"shape {f.features.shape}, expected ({len(f.coords)}, {encoder.embedding_dim})"
            elif not np.isfinite(f.features).all():
                failing[k] = "non-finite values"
            elif not len(f.features):
                failing[k] = f.provenance.get("error") or status_of(f.provenance)
        blank = {k: f"{f.provenance['blank_tiles']} blank patch(es): corrupt tiles" for k, f in out.items()
                 if f.provenance.get("blank_tiles")}
        yield dg.Output(out, metadata={**single_metadata(out, lambda k, f: {
            "status": status_of(f.provenance), "patches": len(f.features), "dim": encoder.embedding_dim,
            "seconds": f.provenance.get("seconds", 0.0), "blank_tiles": f.provenance.get("blank_tiles", 0),
            "patches_per_second": f.provenance.get("patches_per_second", 0.0)}),
            "encoder": pe.name, "device": device, "model_load_seconds": round(load_seconds, 3),
            "weights_sha256": prov["weights_sha256"]})
        yield check("features_valid", context.asset_key, failing, len(out))
        yield check("tiles_readable", context.asset_key, blank, len(out), dg.AssetCheckSeverity.WARN)

    return features


def _embedding_asset(settings: Settings, se, common):
    pe = settings.patch_encoder_for(se.name)
    key = dg.AssetKey(["slide_embeddings", se.name])
    version = version_of(LIB, se.name, weights_fingerprint(se.weights_path), pe.name)

    @dg.asset(**common, key=key, group_name="features", code_version=version, kinds={"hdf5", "pytorch"},
              pool="gpu", op_tags=GPU_TAGS, ins={"patch_features": dg.AssetIn(["patch_features", pe.name])},
              metadata={COORDS_DIR_KEY: pe.coords_dir},
              check_specs=[dg.AssetCheckSpec("embedding_valid", asset=key,
                                             description="finite, the slide encoder's dimension")],
              description=f"Slide embedding from {se.name} over {pe.name} features.")
    def embedding(context: dg.AssetExecutionContext, patch_features: dict):
        with lease_device(settings.device) as device:
            remote = {"trust_remote_code": True} if se.trust_remote_code else {}  # only remote-code models take it
            model = warm_model(context, "slide", se.name, se.weights_path, device,
                               lambda: slide_encoder_factory(se.name, weights_path=se.weights_path, **remote), **remote)

            def one(k, f: Features, status: dict | None = None):
                emb = slide_embedding(f.features, f.coords, f.attrs, model, device) if status is None else \
                    np.full(model.embedding_dim, np.nan, np.float32)
                status = status or {"status": "ok" if len(f.features) else status_of(f.provenance)}
                return Features(emb, f.coords, f.attrs, feature_attrs(model, k, pe.coords_dir),
                                {**status, "slide_encoder": se.name})

            out = for_each_slide(context, patch_features, one,
                                 lambda k, e: one(k, patch_features[k], {"status": "error", "error": e}))
        failing = {k: status_of(f.provenance) for k, f in out.items()
                   if f.features.shape != (model.embedding_dim,) or not np.isfinite(f.features).all()}
        yield dg.Output(out, metadata={**single_metadata(out, lambda k, f: {
            "status": status_of(f.provenance), "dim": int(f.features.shape[0]),
            "norm": float(np.linalg.norm(f.features)) if np.isfinite(f.features).all() else -1.0}),
            "slide_encoder": se.name})
        yield check("embedding_valid", context.asset_key, failing, len(out))

    return embedding


def _cohort_embeddings_asset(settings: Settings, se):
    pe = settings.patch_encoder_for(se.name)
    upstream = dg.AssetKey(["slide_embeddings", se.name])

    @dg.asset(key=["cohort_embeddings", se.name], deps=[upstream], group_name="cohort", kinds={"parquet"},
              io_manager_key="trident_io", automation_condition=dg.AutomationCondition.eager(),
              code_version=f"cohort-{LIB}", description=f"One row per slide: its {se.name} embedding.")
    def cohort_embeddings(context: dg.AssetExecutionContext,
                          trident_io: dg.ResourceParam[TridentIOManager]) -> pd.DataFrame:
        def rows(keys):
            found = trident_io.read_existing(["slide_embeddings", se.name], keys, pe.coords_dir)
            return pd.DataFrame([{"slide": k, "status": status_of(f.provenance),
                                  **{f"e{i}": float(v) for i, v in enumerate(f.features)}} for k, f in found.items()])

        table, reread = refresh_table(context, trident_io, [upstream], rows)
        keys = context.instance.get_dynamic_partitions("slides")
        context.add_output_metadata({"slides": len(table), "missing": len(keys) - len(table), "slides_read": reread,
                                     "preview": markdown_table(table.iloc[:, :6]) if len(table) else "empty"})
        return table

    return cohort_embeddings


def refresh_table(context, trident_io: TridentIOManager, upstream: list[dg.AssetKey], rows: Callable,
                  redo: Callable | None = None) -> tuple[pd.DataFrame, int]:
    """A cohort table whose rows are re-made only for slides whose upstream outputs were materialized since
    the table's last build, slides new to the cohort, and rows ``redo`` selects; the rest comes from the last
    build. One refresh after a new slide reads that slide, not the whole cohort. Returns the table and the
    number of slides read."""
    keys = context.instance.get_dynamic_partitions("slides")
    records = context.instance.fetch_materializations(context.asset_key, limit=1).records
    last = records[0] if records else None
    same_code = last and last.asset_materialization.tags.get("dagster/code_version") == \
        context.assets_def.code_versions_by_key.get(context.asset_key)
    previous = trident_io.read_table(list(context.asset_key.path)) if same_code else None
    if previous is None or "slide" not in previous:
        changed = set(keys)
    else:
        changed = changed_slides(context.instance, upstream, last.storage_id) | (set(keys) - set(previous["slide"]))
        if redo is not None and len(previous):
            changed |= set(previous.loc[redo(previous), "slide"])
        previous = previous[previous["slide"].isin(set(keys) - changed)]
    fresh = rows(sorted(changed & set(keys)) if previous is not None else keys)
    table = pd.concat([previous, fresh], ignore_index=True) if previous is not None and len(previous) else fresh
    if len(table):
        order = {k: i for i, k in enumerate(keys)}
        table = table.sort_values("slide", key=lambda c: c.map(lambda k: order.get(k, len(order)))).reset_index(
            drop=True)
    return table, len(changed)


def changed_slides(instance: dg.DagsterInstance, asset_keys: list[dg.AssetKey], after_storage_id: int) -> set[str]:
    """Slides with a materialization of any of ``asset_keys`` after ``after_storage_id`` (paged queries)."""
    out = set()
    for key in asset_keys:
        cursor = None
        while True:
            page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, after_storage_id=after_storage_id),
                                                   limit=5000, cursor=cursor)
            out |= {r.partition_key for r in page.records if r.partition_key}
            if not page.has_more:
                break
            cursor = page.cursor
    return out


def qc_table(settings: Settings, trident_io: TridentIOManager, keys: list[str], instance=None) -> pd.DataFrame:
    """Per slide: status, error, tissue area, mpp and patch count per coordinates setting. A slide with no
    outputs whose last run failed shows that run's error (from ``instance``); files that never finished
    arriving are listed as 'arriving'."""
    coords_dirs = list(settings.coords_configs)
    arriving = trident_io.arriving()
    keys = [*keys, *sorted(set(arriving) - set(keys))]
    tissue = trident_io.read_existing(["tissue_contours"], keys, None)
    coords = {c: trident_io.read_existing(["patch_coords", c], keys, None) for c in coords_dirs}
    failed = failed_run_errors(instance, [k for k in keys if k not in tissue]) if instance else {}
    rows = []
    for k in keys:
        t = tissue.get(k)
        # The first stage that is not ok gives the slide's status (no tissue, too low a resolution, error).
        stages = [t.provenance] if t else []
        stages += [coords[c][k].provenance for c in coords_dirs if k in coords[c]]
        bad = next((p for p in stages if status_of(p) != "ok"), None)
        if t:
            status, error = (status_of(bad), str(bad.get("error", ""))) if bad else ("ok", "")
        elif k in failed:
            status, error = "error", failed[k]
        else:
            status, error = ("arriving", arriving[k]) if k in arriving else ("not_processed", "")
        row = {"slide": k, "status": status, "error": error,
               "tissue_area_px": round(float(t.gdf.area.sum())) if t else 0,
               "mpp": t.provenance.get("mpp") if t else None}
        for c in coords_dirs:
            row[f"patches_{c}"] = len(coords[c][k].coords) if k in coords[c] else -1
        row["qc_pass"] = row["status"] == "ok" and all(row[f"patches_{c}"] > 0 for c in coords_dirs)
        rows.append(row)
    return pd.DataFrame(rows)


def failed_run_errors(instance: dg.DagsterInstance, keys: list[str]) -> dict[str, str]:
    """The error message of each of ``keys`` whose latest single-slide run failed (one query for the runs)."""
    wanted, out, done = set(keys), {}, set()
    # Newest first, whatever the job: the inbox sensor's runs are Dagster's asset job, not process_slides.
    for record in instance.get_run_records(limit=2000):
        k = record.dagster_run.tags.get("dagster/partition")
        if k not in wanted or k in done:
            continue
        done.add(k)
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            continue
        run_id = record.dagster_run.run_id
        failures = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE) or \
            instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        out[k] = failures[-1].message if failures else "its run failed"
        data = failures[-1].dagster_event.event_specific_data if failures else None
        if getattr(data, "user_failure_data", None) and data.user_failure_data.description:
            out[k] = data.user_failure_data.description  # the Failure's own message, without the step prefix
    return out


def _qc_asset(settings: Settings):
    deps = ["tissue_contours", *[["patch_coords", c] for c in settings.coords_configs]]

    @dg.asset(key="cohort_qc", deps=deps, group_name="cohort", kinds={"parquet"}, io_manager_key="trident_io",
              code_version=f"qc-{LIB}", automation_condition=dg.AutomationCondition.eager(),
              description="Per slide: status, tissue area, patch counts; the table to review a cohort by.")
    def cohort_qc(context: dg.AssetExecutionContext, trident_io: dg.ResourceParam[TridentIOManager]) -> pd.DataFrame:
        table, reread = refresh_table(context, trident_io, [dg.AssetKey(d) for d in deps],
                                      lambda keys: qc_table(settings, trident_io, keys, context.instance),
                                      redo=lambda t: t["status"].isin(["not_processed", "error", "arriving"]))
        context.add_output_metadata({"slides": len(table), "passing": int(table["qc_pass"].sum()) if len(table) else 0,
                                     "slides_read": reread, "table": markdown_table(table) if len(table) else "empty"})
        return table

    return cohort_qc
