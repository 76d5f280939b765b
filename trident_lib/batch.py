"""Command line for batch use without Dagster (TRIDENT's run_batch_of_slides flags), plus `convert` and `doctor`.

    trident-dagster batch --task all --wsi_dir slides/ --job_dir job/ --gpus 0,1 --skip_errors
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["seg", "coords", "feat", "all"], default="all")
    p.add_argument("--job_dir", required=True)
    p.add_argument("--wsi_dir", required=True)
    p.add_argument("--gpus", default="", help="devices to shard slides over: '0,1' (GPUs) or 'cpu,cpu'; "
                                              "empty = one process on cuda:0 if present, else cpu")
    p.add_argument("--skip_errors", action="store_true")
    p.add_argument("--clear_dead_locks", action="store_true")
    p.add_argument("--max_workers", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16, help="segmentation batch size")
    p.add_argument("--wsi_ext", nargs="+", default=None)
    p.add_argument("--custom_mpp_keys", nargs="+", default=None)
    p.add_argument("--custom_list_of_wsis", default=None)
    p.add_argument("--reader_type", default=None, choices=["openslide", "image", "cucim", "sdpc", "omezarr", "czi"])
    p.add_argument("--search_nested", action="store_true")
    p.add_argument("--segmenter", default="otsu", choices=["otsu", "hest", "grandqc"])
    p.add_argument("--seg_conf_thresh", type=float, default=0.5)
    p.add_argument("--seg_ckpt_path", default=None)
    p.add_argument("--remove_holes", action="store_true")
    p.add_argument("--remove_artifacts", action="store_true")
    p.add_argument("--remove_penmarks", action="store_true")
    p.add_argument("--mag", type=float, default=20)
    p.add_argument("--patch_size", type=int, default=256)
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--min_tissue_proportion", type=float, default=0.0)
    p.add_argument("--coords_dir", default=None)
    p.add_argument("--dump_patches", action="store_true")
    p.add_argument("--dump_patches_max", type=int, default=0)
    p.add_argument("--dump_patches_format", default="png", choices=["png", "jpg"])
    p.add_argument("--dump_patches_jpeg_quality", type=int, default=90)
    p.add_argument("--patch_encoder", default="efficientnet_lite0")
    p.add_argument("--patch_encoder_ckpt_path", default=None)
    p.add_argument("--slide_encoder", default=None)
    p.add_argument("--feat_batch_size", type=int, default=64)
    p.add_argument("--max_upsampling", type=float, default=2.0,
                   help="refuse patching above this times the scan's magnification (too_low_resolution)")
    p.add_argument("--fast_cpu", action="store_true",
                   help="CPU only: BatchNorm folded, bf16, channels-last (features within cosine 0.999)")
    p.add_argument("--fast_read", action="store_true",
                   help="decode JPEG tiles at the needed scale instead of full size + bicubic (2-3x faster "
                        "reading; pixels not TRIDENT's)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run the model code shipped with a local slide-encoder checkpoint (TITAN, PRISM)")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/n", set for the per-device processes


def _without_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def _device(gpu: str) -> str:
    import torch

    if gpu == "":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cpu" if gpu == "cpu" else f"cuda:{gpu}"


def run_batch(args) -> int:
    from .processor import Processor, clear_dead_locks

    devices = [d.strip() for d in args.gpus.split(",")] if args.gpus else [""]
    if args.clear_dead_locks and args.shard is None:
        removed = clear_dead_locks(args.job_dir)
        print(f"cleared {len(removed)} dead lock(s)")
    if len(devices) > 1 and args.shard is None:  # one process per device, each with its share of the slides
        base = _without_gpus(args.argv)
        procs = [subprocess.Popen([sys.executable, "-m", "trident_lib.batch", "batch", *base,
                                   "--shard", f"{i}/{len(devices)}", "--gpus", dev]) for i, dev in enumerate(devices)]
        codes = [p.wait() for p in procs]
        return max(codes)

    processor = Processor(args.job_dir, args.wsi_dir, wsi_ext=args.wsi_ext, skip_errors=args.skip_errors,
                          custom_mpp_keys=args.custom_mpp_keys, custom_list_of_wsis=args.custom_list_of_wsis,
                          max_workers=args.max_workers, reader_type=args.reader_type, search_nested=args.search_nested)
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        processor.wsis = processor.wsis[i::n]
    device = _device(devices[0])
    coords_dir = args.coords_dir or f"{args.mag:g}x_{args.patch_size}px_{args.overlap}px_overlap"
    print(f"{len(processor.wsis)} slide(s) from {args.wsi_dir} on {device}")
    try:
        if args.task in ("seg", "all"):
            from .segmentation_models import segmentation_model_factory

            seg = segmentation_model_factory(args.segmenter, confidence_thresh=args.seg_conf_thresh,
                                             **({"weights_path": args.seg_ckpt_path} if args.seg_ckpt_path else {}))
            artifacts = None
            if args.remove_artifacts or args.remove_penmarks:
                artifacts = segmentation_model_factory("grandqc_artifact",
                                                       remove_penmarks_only=args.remove_penmarks and
                                                       not args.remove_artifacts)
            processor.run_segmentation_job(seg, holes_are_tissue=not args.remove_holes, batch_size=args.batch_size,
                                           artifact_remover_model=artifacts, device=device)
        if args.task in ("coords", "all"):
            processor.run_patching_job(args.mag, args.patch_size, args.overlap, saveto=args.coords_dir,
                                       min_tissue_proportion=args.min_tissue_proportion,
                                       dump_patches=args.dump_patches, dump_patches_max=args.dump_patches_max,
                                       dump_patches_format=args.dump_patches_format,
                                       dump_patches_jpeg_quality=args.dump_patches_jpeg_quality,
                                       max_upsampling=args.max_upsampling)
        if args.task in ("feat", "all"):
            if args.slide_encoder:
                from .slide_encoder_models import encoder_factory as slide_factory

                remote = {"trust_remote_code": True} if args.trust_remote_code else {}
                processor.run_slide_feature_extraction_job(slide_factory(args.slide_encoder, **remote), coords_dir,
                                                           device, batch_limit=args.feat_batch_size,
                                                           patch_encoder_ckpt_path=args.patch_encoder_ckpt_path,
                                                           fast_cpu=args.fast_cpu, fast_read=args.fast_read)
            else:
                from .patch_encoder_models import encoder_factory

                enc = encoder_factory(args.patch_encoder, weights_path=args.patch_encoder_ckpt_path)
                processor.run_patch_feature_extraction_job(coords_dir, enc, device, batch_limit=args.feat_batch_size,
                                                           fast_cpu=args.fast_cpu, fast_read=args.fast_read)
    except Exception as e:  # noqa: BLE001  without --skip_errors the first failure stops the run
        print(f"stopped: {e}\n(use --skip_errors to carry on past failing slides)", file=sys.stderr)
        return 1
    finally:
        print_summary(processor)
        processor.release()
    return 1 if processor.failed and not args.skip_errors else 0


def print_summary(processor) -> None:
    print(f"\nrun {processor.run_id}: {processor.job_dir}")
    for s in processor._record["stages"]:
        print(f"  {s['stage']:<36} done {s['done']:>4}  skipped {s['skipped']:>4}  failed {s['failed']:>4}  "
              f"{s['seconds']:.1f}s")
        for name, err in s["errors"].items():
            print(f"    {name}: {err}")
        if s.get("redone"):
            print(f"    redone {len(s['redone'])}: outputs whose settings changed or were not recorded")
    if processor.missing_from_list:
        print(f"  listed but not found: {', '.join(processor.missing_from_list)}")


def run_convert(args) -> int:
    from .converter import AnyToTiffConverter

    paths = AnyToTiffConverter(args.job_dir, bigtiff=args.bigtiff).process_all(
        args.input_dir, args.mpp_csv, downscale_by=args.downscale_by, num_workers=args.num_workers)
    print("\n".join(paths))
    return 0


def run_doctor(args) -> int:
    """Check the install: OpenSlide, torch device, and for each model whose weights are found locally
    (registry, hub cache, packaged) whether they load and what one patch gives. Exit 1 if any fails."""
    import openslide
    import torch

    print(f"OpenSlide {openslide.__library_version__} (openslide-python {openslide.__version__})")
    cuda = torch.cuda.is_available()
    gpus = f"available: {torch.cuda.device_count()} GPU(s)" if cuda else "not available (CPU only)"
    print(f"torch {torch.__version__}; CUDA {gpus}")
    failed = 0
    for name, path, check in _local_models():
        if path is None:
            print(f"  {name:<20} no local weights")
            continue
        if getattr(args, "no_load", False):
            print(f"  {name:<20} weights: {path}")
            continue
        try:
            print(f"  {name:<20} loads; one patch -> {check(path)}  ({path})")
        except Exception as e:  # noqa: BLE001  a report, not a crash: say why and go on
            failed += 1
            print(f"  {name:<20} DOES NOT LOAD: {type(e).__name__}: {e}  ({path})")
    return 1 if failed else 0


def _local_models():
    """(name, local weights path or None, check(path) -> output shape) for patch encoders and segmenters."""
    import torch
    from PIL import Image

    from .patch_encoder_models import REGISTRY, encoder_factory
    from .segmentation_models import SEGMENTERS, segmentation_model_factory
    from .weights import find_weights

    def patch_check(name, size):
        def check(path):
            enc = encoder_factory(name, weights_path=path)
            with torch.inference_mode():
                out = enc(enc.eval_transforms(Image.new("RGB", (size, size), (220, 180, 210)))[None])
            if out.shape[-1] != enc.embedding_dim:
                raise ValueError(f"output {tuple(out.shape)}, expected {enc.embedding_dim} features")
            return tuple(out.shape)
        return check

    def seg_check(name, size):
        def check(path):
            seg = segmentation_model_factory(name, weights_path=path)
            with torch.inference_mode():
                return tuple(seg(seg.eval_transforms(Image.new("RGB", (size, size), (220, 180, 210)))[None]).shape)
        return check

    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        try:
            path = find_weights(name, None, spec.hub_repo, ("config.json",) if spec.from_folder else spec.weight_files)
        except Exception:  # noqa: BLE001
            path = spec.packaged_weights() if spec.packaged_weights else None
        yield name, path, patch_check(name, spec.patch_size)
    for name, cls in sorted(SEGMENTERS.items()):
        if cls.weights_file:
            try:
                path = find_weights(name, None, cls.hub_repo, cls.weights_file)
            except Exception:  # noqa: BLE001
                path = None
            yield name, path, seg_check(name, cls.input_size)


def run_convert_weights(args) -> int:
    from .weights import UnsafeCheckpointError, convert_to_safetensors

    try:
        n = convert_to_safetensors(args.src, args.dst, trust=args.trust)
    except (ValueError, OSError) as e:
        hint = "\n(add --trust to unpickle it in full)" if isinstance(e, UnsafeCheckpointError) else ""
        print(f"{e}{hint}", file=sys.stderr)
        return 1
    print(f"{args.dst}: {n} tensors")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="trident-batch")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return parser


def add_subcommands(sub) -> None:
    b = sub.add_parser("batch", help="process a folder of slides into a TRIDENT job folder (no Dagster)")
    add_batch_arguments(b)
    b.set_defaults(fn=run_batch)
    c = sub.add_parser("convert", help="images + a wsi,mpp CSV -> pyramidal TIFFs")
    c.add_argument("--input_dir", required=True)
    c.add_argument("--mpp_csv", required=True)
    c.add_argument("--job_dir", required=True)
    c.add_argument("--downscale_by", type=int, default=1)
    c.add_argument("--num_workers", type=int, default=1)
    c.add_argument("--bigtiff", action="store_true")
    c.set_defaults(fn=run_convert)
    d = sub.add_parser("doctor", help="check OpenSlide, the torch device and which models' local weights load")
    d.add_argument("--no-load", action="store_true", help="only list where weights are, without loading them")
    d.set_defaults(fn=run_doctor)
    w = sub.add_parser("convert-weights", help="a checkpoint's tensors -> .safetensors (loads without unpickling)")
    w.add_argument("src")
    w.add_argument("dst")
    w.add_argument("--trust", action="store_true", help="unpickle SRC in full if it needs more than plain data: "
                                                          "only for files from a source you trust")
    w.set_defaults(fn=run_convert_weights)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
