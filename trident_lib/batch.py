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
                                       dump_patches_jpeg_quality=args.dump_patches_jpeg_quality)
        if args.task in ("feat", "all"):
            if args.slide_encoder:
                from .slide_encoder_models import encoder_factory as slide_factory

                processor.run_slide_feature_extraction_job(slide_factory(args.slide_encoder), coords_dir, device,
                                                           batch_limit=args.feat_batch_size)
            else:
                from .patch_encoder_models import encoder_factory

                enc = encoder_factory(args.patch_encoder, weights_path=args.patch_encoder_ckpt_path)
                processor.run_patch_feature_extraction_job(coords_dir, enc, device, batch_limit=args.feat_batch_size)
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
    if processor.missing_from_list:
        print(f"  listed but not found: {', '.join(processor.missing_from_list)}")


def run_convert(args) -> int:
    from .converter import AnyToTiffConverter

    paths = AnyToTiffConverter(args.job_dir, bigtiff=args.bigtiff).process_all(
        args.input_dir, args.mpp_csv, downscale_by=args.downscale_by, num_workers=args.num_workers)
    print("\n".join(paths))
    return 0


def run_doctor(args) -> int:
    """Check the install: OpenSlide, torch device, which encoders have weights locally."""
    import openslide
    import torch

    from .patch_encoder_models import REGISTRY, encoder_spec
    from .weights import find_weights

    print(f"OpenSlide {openslide.__library_version__} (openslide-python {openslide.__version__})")
    cuda = torch.cuda.is_available()
    gpus = f"available: {torch.cuda.device_count()} GPU(s)" if cuda else "not available (CPU only)"
    print(f"torch {torch.__version__}; CUDA {gpus}")
    for name in sorted(REGISTRY):
        spec = encoder_spec(name)
        try:
            path = find_weights(name, None, spec.hub_repo, ("config.json",) if spec.from_folder else spec.weight_files)
        except Exception:
            path = spec.packaged_weights() if spec.packaged_weights else None
        print(f"  {name:<20} {'weights: ' + path if path else 'no local weights'}")
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
    d = sub.add_parser("doctor", help="check OpenSlide, the torch device and which encoders have weights")
    d.set_defaults(fn=run_doctor)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
