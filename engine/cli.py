"""``maskrcnn-engine``: the command line (also ``python -m engine.cli``).

    maskrcnn-engine predict INPUT... --output DIR [--weights W] [--family F] [--device D]
        [--precision P] [--batch-size B] [--score-threshold S] [--mask-format full|box]
        [--decode-workers N] [--format jsonl|parquet] [--rows-per-shard N] [--no-progress]
        [--ray [ADDRESS]] [--workers N]
    maskrcnn-engine to-coco DIR [--output FILE] [--annotations ANN.json] [--category-map MAP.json]

``predict`` runs a checkpoint over image files (see :mod:`engine.batch_job`): without
``--weights``, the bundled shapes model. Rerunning it on the same ``--output`` resumes. With
``--ray`` the job runs as a Ray Data pipeline (:mod:`engine.ray_job`) on the cluster at ADDRESS,
or on a local one started for the run. ``to-coco`` turns a run's output folder into a COCO
results file (:mod:`engine.coco_results`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskrcnn-engine", description="Mask R-CNN checkpoints over many images.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "predict",
        help="predict instance masks for image files; results as JSON lines, resumable",
        description="Runs a checkpoint over files, folders (recursive), glob patterns and @list.txt files. "
        "Writes predictions.jsonl, errors.jsonl and run.json in --output; a rerun skips what is done.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns or @list.txt")
    p.add_argument("--output", "-o", required=True, help="output folder (created; reused to resume)")
    p.add_argument("--weights", help="checkpoint file (default: the bundled shapes model)")
    p.add_argument("--family", help="checkpoint family if it cannot be told from the file")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--score-threshold", type=float, default=None)
    p.add_argument("--mask-format", default="full", choices=("full", "box"), help="box: masks kept as box crops (less memory)")
    p.add_argument("--decode-workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"), help="predictions.jsonl, or Parquet shards in predictions.parquet/")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="with --format parquet: images per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run on Ray Data: the cluster at ADDRESS ('auto', 'ray://host:10001'), or a local one without ADDRESS",
    )
    p.add_argument("--workers", type=int, default=1, help="with --ray: predictor actors (one GPU each on GPU nodes)")
    c = commands.add_parser(
        "to-coco",
        help="a predict run's output folder as a COCO results file (for COCO.loadRes / COCOeval)",
        description="Reads predictions.jsonl or predictions.parquet/ of a predict run and writes the COCO results list. "
        "With --annotations, image ids come from the data set's file names and category ids from its category names.",
    )
    c.add_argument("run_dir", metavar="DIR", help="the --output folder of a predict run")
    c.add_argument("--output", "-o", help="results file (default: DIR/coco_results.json)")
    c.add_argument("--annotations", help="the data set's COCO annotation file (image ids by file_name, category ids by name)")
    c.add_argument("--category-map", help='JSON file {"label": category_id, ...}, overriding the lookup by name')
    return parser


def predict(args: argparse.Namespace) -> int:
    from engine import Predictor
    from engine.batch_job import JobOptions, collect_inputs, run_job
    from weights.bundled import file_sha256
    from engine.class_names import default_class_names

    try:
        import pycocotools.mask  # noqa: F401  (the masks are written as COCO RLE)
    except ImportError:
        print("error: predict writes masks as COCO RLE with pycocotools: pip install 'maskrcnn-engine[coco]'", file=sys.stderr)
        return 2
    for name in ("batch_size", "rows_per_shard", "workers", "decode_workers"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.format == "parquet":
        from engine.job_outputs import import_pyarrow

        try:
            import_pyarrow()
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        inputs = collect_inputs(args.inputs)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not inputs:
        print("error: no images found in the inputs", file=sys.stderr)
        return 2
    if args.ray is not None:
        return _predict_on_ray(args, inputs)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = dict(
        device=device, precision=args.precision, score_threshold=args.score_threshold, mask_format=args.mask_format
    )
    if args.weights:
        predictor = Predictor(args.weights, family=args.family, **options)
        weights = Path(args.weights)
        names = default_class_names(predictor.num_classes, background=predictor.config.background_index)
    else:
        from engine.bundled import shapes_model, shapes_predictor

        bundled = shapes_model()
        predictor = shapes_predictor(**options)
        weights = Path(bundled.checkpoint)
        names = list(bundled.class_names)
    config = predictor.config
    record = {
        "weights": str(weights),
        "weights_sha256": file_sha256(weights),
        "family": predictor.family,
        "preset": config.name,
        "device": str(predictor.device),
        "precision": args.precision,
        "mask_format": args.mask_format,
        "num_classes": predictor.num_classes,
        "class_names": names,
        "thresholds": {
            "score": config.score_threshold,
            "nms": config.nms_threshold,
            "mask": config.mask_threshold,
            "detections_per_image": config.detections_per_image,
        },
    }
    job = JobOptions(
        batch_size=args.batch_size, decode_workers=args.decode_workers, progress=not args.no_progress,
        format=args.format, rows_per_shard=args.rows_per_shard,
    )
    try:
        summary = run_job(predictor, inputs, Path(args.output), options=job, class_names=names, record=record)
    except ValueError as exc:  # an output folder holding the other format
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def _predict_on_ray(args: argparse.Namespace, inputs) -> int:
    from weights.bundled import file_sha256
    from engine.ray_job import PredictorSpec, import_ray, run_ray_job

    ray = import_ray()
    address = None if args.ray == "local" else args.ray
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    device = args.device or ("cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu")
    spec = PredictorSpec(
        weights=args.weights, family=args.family, device=device, precision=args.precision,
        score_threshold=args.score_threshold, mask_format=args.mask_format,
    )
    if args.weights:
        from engine.class_names import default_class_names
        from engine.loading import checkpoint_config, load_checkpoint

        checkpoint = load_checkpoint(args.weights, family=args.family)
        background = checkpoint_config(checkpoint).background_index
        names = default_class_names(checkpoint.spec.num_classes, background=background)
        weights, family = Path(args.weights), checkpoint.family
    else:
        from engine.bundled import shapes_model

        bundled = shapes_model()
        names, weights, family = list(bundled.class_names), Path(bundled.checkpoint), "torchvision"
    record = {
        "weights": str(weights),
        "weights_sha256": file_sha256(weights),
        "family": family,
        "device": device,
        "precision": args.precision,
        "mask_format": args.mask_format,
        "score_threshold": args.score_threshold,
        "class_names": names,
    }
    try:
        summary = run_ray_job(
            spec, inputs, Path(args.output), address=address, workers=args.workers, batch_size=args.batch_size,
            class_names=names, record=record, format=args.format, rows_per_shard=args.rows_per_shard,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


def to_coco_command(args: argparse.Namespace) -> int:
    import json

    from engine.coco_results import to_coco

    run_dir = Path(args.run_dir)
    destination = Path(args.output) if args.output else run_dir / "coco_results.json"
    category_map = None
    try:
        if args.category_map:
            category_map = json.loads(Path(args.category_map).read_text())
            if not isinstance(category_map, dict):
                raise ValueError(f"--category-map must hold a JSON object {{label: category_id}}; got {type(category_map).__name__}")
        written = to_coco(run_dir, destination, annotations=args.annotations, category_map=category_map)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = f"; image ids in {written['images_index']}" if written["images_index"] else ""
    print(f"{written['detections']} detections of {written['images']} images in {written['results']}{extra}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "predict":
        return predict(args)
    if args.command == "to-coco":
        return to_coco_command(args)
    return 2  # pragma: no cover - argparse refuses other commands


if __name__ == "__main__":
    raise SystemExit(main())
