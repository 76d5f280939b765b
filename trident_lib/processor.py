"""TRIDENT's batch API: a ``Processor`` over a folder of slides, writing a TRIDENT job folder.

Each stage calls the same functions the Dagster assets call (one implementation per stage). On top:
resume, ``.lock`` files with pid, host and time, run records (``runs/<run_id>.json``,
``wsi_states/<slide>__<hash>.json``, ``summary.md``), and skip_errors.

Resume: an output is reused only when it is complete and the hash of the settings that produced it, recorded
in the slide's state file, equals the hash of the current settings. Each stage's settings include the
recorded hash of its input (contours -> coords -> patch features -> slide features), so a change upstream
redoes everything downstream. Outputs without a recorded hash (written before hashes were recorded, or by
another tool) are redone: what produced them is unknown, and a wrong reuse is silent while a redo only costs
time.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from typing import Any

import h5py
import torch

from .errors import SlideError
from .extraction import extract_patch_features, extract_slide_features
from .io import write_json
from .mpp import MAX_UPSAMPLING, format_mag
from .readers import SUPPORTED_EXTENSIONS, WSI, load_wsi, slide_extension
from .segmentation import segment_tissue

LOCK_SUFFIX = ".lock"


# -- locks --------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_dead(lock_path: str) -> bool:
    """A lock is dead when its process on this host is gone (locks of other hosts are left alone)."""
    try:
        with open(lock_path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return True  # unreadable: written by a process that died mid-write
    return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def clear_dead_locks(job_dir: str) -> list[str]:
    """Remove the locks left by processes that died, and the hidden temporary files those processes were
    writing (never visible as outputs, but they take space); returns the paths removed."""
    removed = []
    for root, _, files in os.walk(job_dir):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(LOCK_SUFFIX) and lock_is_dead(path):
                os.remove(path)
                removed.append(path)
        for name in files:  # ".<output>.<random>.tmp" whose output is no longer locked by a live process
            if name.startswith(".") and name.endswith(".tmp"):
                target = os.path.join(root, name[1:].rsplit(".", 2)[0])
                if not os.path.exists(target + LOCK_SUFFIX):
                    os.remove(os.path.join(root, name))
                    removed.append(os.path.join(root, name))
    return removed


@contextmanager
def output_lock(output_path: str):
    """Hold ``<output>.lock`` while the output is produced. Raises FileExistsError if a live process holds it."""
    lock = output_path + LOCK_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    if os.path.exists(lock) and lock_is_dead(lock):
        os.remove(lock)
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": dt.datetime.now().isoformat()}, f)
    try:
        yield
    finally:
        if os.path.exists(lock):
            os.remove(lock)


# -- completeness checks (what "an output that exists and is complete" means per stage) ----------------

def _complete(path: str, kind: str) -> bool:
    if not os.path.exists(path) or os.path.exists(path + LOCK_SUFFIX):
        return False
    try:
        if kind == "geojson":
            with open(path) as f:
                return json.load(f).get("type") == "FeatureCollection"
        if kind in ("coords", "features"):  # check the structure without reading the arrays
            with h5py.File(path, "r") as f:
                if "coords" not in f or (kind == "features" and "features" not in f):
                    return False
                if kind == "features" and f["features"].ndim == 2:
                    return f["features"].shape[0] == f["coords"].shape[0]
        return True
    except (ValueError, OSError, json.JSONDecodeError):
        return False


# -- settings hashes (what produced an output) ---------------------------------------------------------

def settings_hash(settings: dict) -> str:
    """Short sha256 of canonical JSON; 20 and 20.0 hash alike (the CLI passes floats, Python users ints)."""
    def canon(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, dict):
            return {str(k): canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return v

    text = json.dumps(canon(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _weights_id(model) -> str:
    """The weights file's sha256; for a model built in memory (custom or random weights), a digest of its
    parameters, so different weights never share a hash."""
    sha = getattr(model, "weights_sha256", None)
    if sha:
        return sha
    h = hashlib.sha256()
    for name, t in model.state_dict().items() if isinstance(model, torch.nn.Module) else ():
        h.update(name.encode())
        h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "params:" + h.hexdigest()


def _model_id(model, device: str | None = None) -> dict | None:
    if model is None:
        return None
    out = {"name": getattr(model, "enc_name", type(model).__name__), "weights": _weights_id(model)}
    for attr in ("confidence_thresh", "whole_slide", "remove_penmarks_only", "target_mag", "input_size"):
        if hasattr(model, attr):
            out[attr] = getattr(model, attr)
    if device is not None:  # encoders run in their own precision on CUDA only, in fp32 elsewhere
        cuda = torch.device(device).type == "cuda"
        out["compute_dtype"] = str(getattr(model, "precision", torch.float32) if cuda else torch.float32)
    return out


class Processor:
    """Batch processing of a folder of slides into a TRIDENT job folder."""

    def __init__(self, job_dir: str, wsi_source: str, wsi_ext: list[str] | None = None, wsi_cache: str | None = None,
                 clear_cache: bool = False, skip_errors: bool = False, custom_mpp_keys: list[str] | None = None,
                 custom_list_of_wsis: str | None = None, max_workers: int | None = None,
                 reader_type: str | None = None, search_nested: bool = False,
                 selected_wsi_paths: list[str] | None = None):
        if wsi_cache is not None or clear_cache:
            warnings.warn("wsi_cache and clear_cache are deprecated and ignored: slides are read in place.",
                          DeprecationWarning, stacklevel=2)
        if wsi_ext is not None:
            assert isinstance(wsi_ext, list) and all(e.startswith(".") for e in wsi_ext), \
                "wsi_ext must be a list of extensions starting with '.'"
        job_dir, wsi_source = os.fspath(job_dir), os.fspath(wsi_source)
        custom_list_of_wsis = os.fspath(custom_list_of_wsis) if custom_list_of_wsis is not None else None
        self.job_dir = job_dir
        self.wsi_source = wsi_source
        self.wsi_ext = [e.lower() for e in wsi_ext] if wsi_ext else list(SUPPORTED_EXTENSIONS)
        self.skip_errors = skip_errors
        self.custom_mpp_keys = custom_mpp_keys
        self.custom_list_of_wsis = custom_list_of_wsis
        self.max_workers = max_workers
        self.reader_type = reader_type
        self.search_nested = search_nested
        self.run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        os.makedirs(job_dir, exist_ok=True)
        self.missing_from_list: list[str] = []
        mpps: dict[str, float] = {}
        paths = [os.fspath(p) for p in selected_wsi_paths] if selected_wsi_paths else self._discover()
        if custom_list_of_wsis:
            paths, mpps = self._apply_list(paths, custom_list_of_wsis)
        self.wsis: list[WSI] = [self._make_wsi(p, mpps) for p in sorted(paths)]
        self._record = {"run_id": self.run_id, "args": self._args(), "started": dt.datetime.now().isoformat(),
                        "stages": [], "status": "running"}

    # -- discovery ----------------------------------------------------------------------------------
    def _discover(self) -> list[str]:
        found = []
        for root, dirs, files in os.walk(self.wsi_source):
            for name in sorted(dirs + files):
                path = os.path.join(root, name)
                if slide_extension(path) in self.wsi_ext and not name.startswith("."):
                    found.append(path)
            if not self.search_nested:
                break
            dirs[:] = [d for d in dirs if slide_extension(os.path.join(root, d)) not in (".zarr", ".dcm")]
        return found

    def _apply_list(self, paths: list[str], csv_path: str) -> tuple[list[str], dict[str, float]]:
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
        if rows and "wsi" not in rows[0]:
            raise ValueError(f"{csv_path}: needs a 'wsi' column (and optionally 'mpp').")
        by_rel = {os.path.relpath(p, self.wsi_source): p for p in paths}
        by_name = {os.path.basename(p): p for p in paths}
        kept, mpps = [], {}
        for row in rows:
            wanted = row["wsi"].strip()
            path = by_rel.get(wanted) or by_name.get(wanted)
            if path is None:
                self.missing_from_list.append(wanted)
                continue
            kept.append(path)
            if row.get("mpp"):
                mpps[path] = float(row["mpp"])
        if self.missing_from_list:
            warnings.warn(f"{csv_path}: {len(self.missing_from_list)} listed slide(s) not found in "
                          f"{self.wsi_source}: {', '.join(self.missing_from_list[:10])}", stacklevel=3)
        return kept, mpps

    def slide_name(self, path: str) -> str:
        """The file name without extension; nested slides are named by their relative path (a/b -> a__b),
        so equal file names in different folders do not collide."""
        rel = os.path.relpath(path, self.wsi_source)
        stem = os.path.splitext(rel)[0]
        return stem.replace(os.sep, "__")

    def _make_wsi(self, path: str, mpps: dict[str, float]) -> WSI:
        kwargs: dict[str, Any] = {"name": self.slide_name(path), "custom_mpp_keys": self.custom_mpp_keys,
                                  "lazy_init": True}
        if path in mpps:
            kwargs["mpp"] = mpps[path]
        try:
            return load_wsi(path, reader_type=self.reader_type, **kwargs)
        except SlideError as e:  # unsupported extension: keep it so the run reports it with the others
            return _UnreadableSlide(path, kwargs["name"], e)

    def _args(self) -> dict:
        return {k: v for k, v in vars(self).items() if isinstance(v, (str, int, float, bool, list, type(None)))
                and k not in ("missing_from_list", "wsis")}

    # -- one stage over all slides -----------------------------------------------------------------
    def _run_stage(self, stage: str, output_for, kind: str, work, settings_for) -> dict:
        """``settings_for(wsi)`` is the dict of everything that decides the output's content."""
        t0 = time.perf_counter()
        counts = {"done": 0, "skipped": 0, "failed": 0}
        errors, redone = {}, {}
        for wsi in _progress(self.wsis, stage):
            out = output_for(wsi)
            state = self._state(wsi)
            settings = settings_for(wsi)
            digest = settings_hash(settings)
            recorded = self._recorded_hash(state, out)
            if _complete(out, kind):
                if recorded == digest:
                    counts["skipped"] += 1
                    continue
                redone[wsi.name] = "settings changed" if recorded else "no settings recorded"
                print(f"redoing {stage} for {wsi.name}: {redone[wsi.name]} ({out})", flush=True)
            state["attempts"].append({"stage": stage, "run_id": self.run_id, "time": dt.datetime.now().isoformat()})
            try:
                if isinstance(wsi, _UnreadableSlide):
                    raise wsi.error
                with output_lock(out):
                    work(wsi, out)
                state["outputs"][stage] = out
                state.setdefault("settings", {})[self._key(out)] = {"hash": digest, "settings": settings}
                counts["done"] += 1
            except FileExistsError:
                errors[wsi.name] = f"{out} is locked by another live process; skipped"
                counts["failed"] += 1
            except Exception as e:  # noqa: BLE001  every failure is recorded; skip_errors decides
                errors[wsi.name] = f"{type(e).__name__}: {e}"
                state["errors"].append({"stage": stage, "run_id": self.run_id, "error": errors[wsi.name]})
                counts["failed"] += 1
                if not self.skip_errors:
                    self._save_state(wsi, state)
                    self._finish_stage(stage, counts, errors, t0, redone)
                    raise
            finally:
                wsi.release()
                gc.collect()  # nothing per slide outlives the slide (flat memory over long cohorts)
            self._save_state(wsi, state)
        self._finish_stage(stage, counts, errors, t0, redone)
        return {**counts, "redone": len(redone)}

    def _finish_stage(self, stage, counts, errors, t0, redone):
        self._record["stages"].append({"stage": stage, "seconds": round(time.perf_counter() - t0, 3), **counts,
                                       "errors": errors, "redone": redone})
        failed = sum(s["failed"] for s in self._record["stages"])
        self._record.update(ended=dt.datetime.now().isoformat(), status="failed" if failed else "ok")
        write_json(os.path.join(self.job_dir, "runs", f"{self.run_id}.json"), self._record)
        self._append_summary(stage, counts, errors, redone)

    def _append_summary(self, stage, counts, errors, redone):
        lines = [f"\n## {self.run_id} · {stage}\n", f"- done {counts['done']} (redone {len(redone)}), "
                 f"skipped {counts['skipped']}, failed {counts['failed']}\n"]
        lines += [f"- **{name}**: {err}\n" for name, err in errors.items()]
        with open(os.path.join(self.job_dir, "summary.md"), "a") as f:
            f.writelines(lines)

    def _state_path(self, wsi) -> str:
        digest = hashlib.sha1(os.path.abspath(wsi.slide_path).encode()).hexdigest()[:8]
        return os.path.join(self.job_dir, "wsi_states", f"{wsi.name}__{digest}.json")

    def _state(self, wsi) -> dict:
        path = self._state_path(wsi)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {"slide": wsi.name, "path": wsi.slide_path, "attempts": [], "outputs": {}, "errors": []}

    def _save_state(self, wsi, state):
        write_json(self._state_path(wsi), state)

    def _key(self, out: str) -> str:
        return os.path.relpath(out, self.job_dir)  # relative: the job folder can be moved

    def _recorded_hash(self, state: dict, out: str) -> str | None:
        return state.get("settings", {}).get(self._key(out), {}).get("hash")

    def _input_hash(self, wsi, path: str) -> str | None:
        """The recorded settings hash of an upstream output; part of the downstream settings."""
        return self._recorded_hash(self._state(wsi), path)

    # -- the seed's jobs ---------------------------------------------------------------------------------
    def run_segmentation_job(self, segmentation_model, seg_mag: int = 10, holes_are_tissue: bool = False,
                             batch_size: int = 16, artifact_remover_model=None, device: str = "cuda:0") -> str:
        self.save_config(os.path.join(self.job_dir, "_config_segmentation.json"),
                         {"segmenter": type(segmentation_model).__name__, "seg_mag": seg_mag,
                          "holes_are_tissue": holes_are_tissue, "device": device})

        def work(wsi, out):
            segment_tissue(wsi, segmentation_model, target_mag=seg_mag, holes_are_tissue=holes_are_tissue,
                           job_dir=self.job_dir, batch_size=batch_size, device=device, num_workers=self.max_workers,
                           artifact_remover_model=artifact_remover_model)

        settings = {"segmenter": _model_id(segmentation_model), "seg_mag": seg_mag,
                    "holes_are_tissue": holes_are_tissue, "artifact_remover": _model_id(artifact_remover_model)}
        self._run_stage("segmentation", lambda w: self._contours_path(w), "geojson", work, lambda w: settings)
        return os.path.abspath(os.path.join(self.job_dir, "contours_geojson"))

    def _contours_path(self, wsi) -> str:
        return os.path.join(self.job_dir, "contours_geojson", f"{wsi.name}.geojson")

    @staticmethod
    def _coords_path(coords_dir: str, wsi) -> str:
        return os.path.join(coords_dir, "patches", f"{wsi.name}_patches.h5")

    def run_patching_job(self, target_magnification: int, patch_size: int, overlap: int = 0, saveto: str | None = None,
                         visualize: bool = True, min_tissue_proportion: float = 0.0, dump_patches: bool = False,
                         dump_patches_max: int = 0, dump_patches_format: str = "png",
                         dump_patches_jpeg_quality: int = 90, max_upsampling: float = MAX_UPSAMPLING) -> str:
        saveto = os.path.join(self.job_dir, saveto or
                              f"{format_mag(target_magnification)}x_{patch_size}px_{overlap}px_overlap")
        self.save_config(os.path.join(saveto, "_config_coords.json"),
                         {"target_magnification": target_magnification, "patch_size": patch_size,
                          "overlap": overlap, "min_tissue_proportion": min_tissue_proportion})

        def work(wsi, out):
            mask = self._contours_path(wsi)
            if not os.path.exists(mask):
                raise FileNotFoundError(f"{wsi.name}: no tissue contours at {mask}; run the segmentation job first.")
            path = wsi.extract_tissue_coords(target_magnification, patch_size, saveto, overlap=overlap,
                                             min_tissue_proportion=min_tissue_proportion, mask=mask,
                                             max_upsampling=max_upsampling)
            if visualize:
                wsi.visualize_coords(path, os.path.join(saveto, "visualization"))
            if dump_patches:
                wsi.dump_patches(path, os.path.join(saveto, "patch_images"), dump_patches_max, dump_patches_format,
                                 dump_patches_jpeg_quality)

        def settings_for(wsi):
            return {"target_magnification": target_magnification, "patch_size": patch_size, "overlap": overlap,
                    "min_tissue_proportion": min_tissue_proportion, "max_upsampling": max_upsampling,
                    "contours": self._input_hash(wsi, self._contours_path(wsi))}

        self._run_stage("patching", lambda w: self._coords_path(saveto, w), "coords", work, settings_for)
        return os.path.abspath(saveto)

    def run_patch_feature_extraction_job(self, coords_dir: str, patch_encoder, device: str, saveas: str = "h5",
                                         batch_limit: int = 512, saveto: str | None = None, fast_cpu: bool = False,
                                         fast_read: bool = False) -> str:
        """``fast_cpu`` and ``fast_read`` trade exactness for speed (features close to the exact ones: see
        bench/bench_features.py and bench/bench_read.py); off, the features are TRIDENT's."""
        coords_dir = os.path.join(self.job_dir, coords_dir)
        saveto = saveto or os.path.join(coords_dir, f"features_{patch_encoder.enc_name}")
        self.save_config(os.path.join(saveto, "_config_feats.json"),
                         {"patch_encoder": patch_encoder.enc_name, "device": device, "batch_limit": batch_limit,
                          "weights_sha256": getattr(patch_encoder, "weights_sha256", None)})

        def work(wsi, out):
            coords = self._coords_path(coords_dir, wsi)
            if not os.path.exists(coords):
                raise FileNotFoundError(f"{wsi.name}: no coordinates at {coords}; run the patching job first.")
            extract_patch_features(wsi, patch_encoder, coords, saveto, device=device, saveas=saveas,
                                   batch_limit=batch_limit, num_workers=self.max_workers, fast_cpu=fast_cpu,
                                   fast_read=fast_read)

        encoder_id = _model_id(patch_encoder, device)

        def settings_for(wsi):
            return {"patch_encoder": encoder_id, "fast_cpu": fast_cpu, "fast_read": fast_read,
                    "coords": self._input_hash(wsi, self._coords_path(coords_dir, wsi))}

        kind = "features" if saveas == "h5" else "pt"
        self._run_stage(f"features_{patch_encoder.enc_name}", lambda w: os.path.join(saveto, f"{w.name}.{saveas}"),
                        kind, work, settings_for)
        return os.path.abspath(saveto)

    def run_feature_extraction_job(self, *args, **kwargs) -> str:
        warnings.warn("run_feature_extraction_job is deprecated; use run_patch_feature_extraction_job.",
                      DeprecationWarning, stacklevel=2)
        return self.run_patch_feature_extraction_job(*args, **kwargs)

    def run_slide_feature_extraction_job(self, slide_encoder, coords_dir: str, device: str = "cuda",
                                         batch_limit: int = 512, saveas: str = "h5", saveto: str | None = None,
                                         patch_encoder_ckpt_path: str | None = None, fast_cpu: bool = False,
                                         fast_read: bool = False) -> str:
        """Slide embeddings; the patch features they need are extracted first (with the patch encoder's
        weights from ``patch_encoder_ckpt_path`` when given), or reused when current."""
        from .patch_encoder_models import encoder_factory as patch_encoder_factory
        from .slide_encoder_models import slide_to_patch_encoder_name

        patch_name = slide_to_patch_encoder_name[slide_encoder.enc_name]
        # Always run: it skips the features whose settings are current and redoes the others.
        features_dir = self.run_patch_feature_extraction_job(
            coords_dir, patch_encoder_factory(patch_name, weights_path=patch_encoder_ckpt_path), device,
            batch_limit=batch_limit, fast_cpu=fast_cpu, fast_read=fast_read)
        saveto = saveto or os.path.join(self.job_dir, coords_dir, f"slide_features_{slide_encoder.enc_name}")
        self.save_config(os.path.join(saveto, "_config_slide_features.json"),
                         {"slide_encoder": slide_encoder.enc_name, "patch_encoder": patch_name, "device": device,
                          "patch_encoder_ckpt_path": patch_encoder_ckpt_path})

        def features_path(wsi):
            return os.path.join(features_dir, f"{wsi.name}.h5")

        def work(wsi, out):
            extract_slide_features(features_path(wsi), slide_encoder, saveto, device=device, name=wsi.name)

        encoder_id = _model_id(slide_encoder, device)

        def settings_for(wsi):
            return {"slide_encoder": encoder_id, "patch_features": self._input_hash(wsi, features_path(wsi))}

        self._run_stage(f"slide_features_{slide_encoder.enc_name}",
                        lambda w: os.path.join(saveto, f"{w.name}.h5"), "features", work, settings_for)
        return os.path.abspath(saveto)

    def save_config(self, saveto: str, local_attrs: dict | None = None, ignore: list[str] = ["valid_slides"]) -> None:
        config = {k: v for k, v in self._args().items() if k not in ignore}
        config.update(local_attrs or {})
        write_json(saveto, config)

    @property
    def failed(self) -> int:
        return sum(s["failed"] for s in self._record["stages"])

    def release(self) -> None:
        for wsi in self.wsis:
            wsi.release()
        gc.collect()


class _UnreadableSlide:
    """Stands in for a slide whose format no reader handles, so the job reports it like any other failure."""

    def __init__(self, path, name, error):
        self.slide_path, self.name, self.error = path, name, error

    def release(self):
        pass


def _progress(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="slide", leave=False)
    except ImportError:
        return items
